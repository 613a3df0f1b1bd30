"""The worker: lifecycle (worker, opening, reporting), the broker session (session, connections,
consumers, prefetch), batches (batching, processors), one batch (pipeline, acks, deadletter)."""
