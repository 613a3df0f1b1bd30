"""The worker: its lifecycle (``worker``), the broker session (``session``), batches
(``batching``), one batch through the store (``pipeline``), acks, dead letters, health."""
