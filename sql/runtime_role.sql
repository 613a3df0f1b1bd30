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
-- What the worker does with each right. Rights are granted column by column: a right on
-- the whole table would also cover columns added later, and UPDATE the keys and tenants
-- of a version.
--   prompt_templates  SELECT (id, org_id, workspace_id)
--                         the tenancy check of each event's template; `status` counts rows
--   prompt_versions   SELECT (every column)   the version ids, and the merge reads the row
--                     INSERT (every column but id, which defaults)   new version keys
--                     UPDATE (first_seen_at, last_seen_at, fingerprint_captured_at,
--                             provider, model_id)   the merge (and its FOR NO KEY UPDATE
--                             lock); never the key or the tenant of a version
--   prompt_results    INSERT (every column)   COPY, INSERT and INSERT ... ON CONFLICT
--                     SELECT (every column but version_id)   which event ids are stored,
--                             and comparing a repeated event with its stored row (in SQL:
--                             the payloads are read, never sent back); `status`
-- Nothing else: no DELETE or TRUNCATE, no UPDATE of results, no DDL (no CREATE on the
-- schema or the database, owns no object), not a superuser, cannot create roles or
-- databases, no replication, no BYPASSRLS, member of no role. Templates are registered by
-- the owner role (`prompter-worker templates add`), never by the worker.

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

-- REVOKE ALL on a table takes back its column rights too.
REVOKE ALL ON prompt_templates, prompt_versions, prompt_results FROM :"role";
-- id and tenant: the tenancy check of every batch; name and deleted_at: `trace`.
GRANT SELECT (id, org_id, workspace_id, name, deleted_at) ON prompt_templates TO :"role";
GRANT SELECT (id, org_id, workspace_id, template_id, provider_version_key, provider,
              model_id, fingerprint_captured_at, first_seen_at, last_seen_at),
      INSERT (org_id, workspace_id, template_id, provider_version_key, provider, model_id,
              fingerprint_captured_at, first_seen_at, last_seen_at),
      UPDATE (first_seen_at, last_seen_at, fingerprint_captured_at, provider, model_id)
    ON prompt_versions TO :"role";
GRANT INSERT (id, org_id, workspace_id, template_id, version_id, provider_version_key,
              system_fingerprint, request, response, analysis_config, created_at),
      SELECT (id, org_id, workspace_id, template_id, provider_version_key,
              system_fingerprint, request, response, analysis_config, created_at)
    ON prompt_results TO :"role";

COMMIT;
