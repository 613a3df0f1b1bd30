-- The runtime role of prompter-worker: what ingestion needs, and nothing more.
--
-- Run it as the migration owner (or a superuser), in the worker's database, after
-- `prompter-worker migrate`, and again after a migration that adds a table the worker uses:
--
--   psql "postgresql://owner@db.example.com/prompter?sslmode=verify-full" \
--        -v role=prompter_worker -v password="$(cat /run/secrets/worker_db_password)" \
--        -f sql/runtime_role.sql
--
-- `role` defaults to prompter_worker; without `password` the role gets none (for
-- certificate or peer authentication). Idempotent: re-running it resets the role's
-- attributes and its rights on the three tables to exactly these.
--
-- What the worker does with each right:
--   prompt_templates  SELECT          the tenancy check of each event's template
--   prompt_versions   SELECT, INSERT, UPDATE   the version upsert (ON CONFLICT DO UPDATE)
--   prompt_results    SELECT, INSERT  the insert (ON CONFLICT DO NOTHING ... RETURNING id),
--                                     and `prompter-worker status`
-- Nothing else: no DELETE or TRUNCATE, no DDL (no CREATE on the schema or the database,
-- owns no object), not a superuser, cannot create roles or databases, no replication, no
-- BYPASSRLS, member of no role. Templates are registered by the owner role
-- (`prompter-worker templates add`), never by the worker.

\set ON_ERROR_STOP on
\if :{?role}
\else
\set role prompter_worker
\endif

BEGIN;

SELECT format('CREATE ROLE %I', :'role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec

ALTER ROLE :"role" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    NOINHERIT;
\if :{?password}
ALTER ROLE :"role" WITH PASSWORD :'password';
\endif

-- The database: connect; no CREATE of schemas. (Temporary tables stay allowed through
-- PUBLIC's default TEMPORARY right: they are private to the session and change no schema.)
SELECT format('REVOKE ALL ON DATABASE %I FROM %I', current_database(), :'role') \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'role') \gexec

-- The schema: look up its objects, create none. PostgreSQL 15 already refuses CREATE on
-- public to PUBLIC; clusters created by older versions granted it to every role.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
REVOKE ALL ON SCHEMA public FROM :"role";
GRANT USAGE ON SCHEMA public TO :"role";

REVOKE ALL ON prompt_templates, prompt_versions, prompt_results FROM :"role";
GRANT SELECT ON prompt_templates TO :"role";
GRANT SELECT, INSERT, UPDATE ON prompt_versions TO :"role";
GRANT SELECT, INSERT ON prompt_results TO :"role";

COMMIT;
