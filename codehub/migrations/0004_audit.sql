-- The audit log (codehub/audit.py): one row per admin API call (and, with sign-in, per
-- self-service action). Rows are only ever appended.
CREATE TABLE audit_log (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    action text NOT NULL,
    workspace_id text,
    status integer NOT NULL,
    request_id text NOT NULL,
    detail jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_workspace ON audit_log (workspace_id, id);
CREATE INDEX audit_log_actor ON audit_log (actor, id);
