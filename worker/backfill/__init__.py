"""History from files: JSON lines read safely (``jsonl``), one loop over two sinks,
the broker or the database (``replay``), checkpoints and reports."""
