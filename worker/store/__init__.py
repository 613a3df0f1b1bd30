"""PostgreSQL: a batch of events stored in one transaction (``ingest``), the schema the
worker needs checked at start (``schema``) and made by the ``migrate`` command (``migrations``).

Storing a batch: ``ingest`` (the Store: pool, caches, the transaction redone until it
commits), ``writer`` (one attempt at it: the statements that write events), ``versions``
(version rows from events), ``repeats`` (ids stored already), ``outcomes``, ``sql`` (every
statement, named), ``classify`` (what a failure means), ``pool`` (connections).

The schema: ``schema`` (the check), ``structure`` (the tables, columns and keys it needs),
``revisions`` (the version tables), ``migrations`` and ``migration_failures`` (``migrate``).
"""
