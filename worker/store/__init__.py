"""PostgreSQL: one batch of events in one transaction (``ingest``), the schema the
worker needs (``schema``) and the migrations that make it (``migrations``)."""
