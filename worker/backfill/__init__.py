"""Backfill: events from JSON-lines files, through the broker or straight into the database,
by one loop (``run``) over two sinks (``sinks``), resumable (``checkpoint``) and reported."""
