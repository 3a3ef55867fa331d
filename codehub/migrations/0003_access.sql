-- Credentials bound to a workspace's life (codehub/gateway/auth.py).
-- access_nonce: part of every access link and cookie of the workspace; made with the row,
-- replaced by revoke-access. A re-created id gets a new one, so nothing of the earlier
-- workspace of that id opens it.
ALTER TABLE workspaces ADD COLUMN access_nonce text NOT NULL
    DEFAULT replace(gen_random_uuid()::text, '-', '');

-- Access links already exchanged for a cookie: a link works once. Rows are kept until the
-- link would have expired anyway (plus a margin for clock skew between replicas).
CREATE TABLE used_links (
    link_id text PRIMARY KEY,
    workspace_id text NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX used_links_expires_at ON used_links (expires_at);
