-- The workspaces table: one row per workspace, the single source of truth for the
-- reconciler. `operation` is written before an external action starts and cleared in
-- the same write that records its result (see codehub/model.py).
CREATE TABLE workspaces (
    id                    text PRIMARY KEY,
    owner                 text NOT NULL,
    image_ref             text NOT NULL,
    desired_state         text NOT NULL DEFAULT 'RUNNING'
        CHECK (desired_state IN ('RUNNING', 'WARM', 'COLD', 'DELETED')),
    status                text NOT NULL DEFAULT 'NEW'
        CHECK (status IN ('NEW', 'WARM', 'RUNNING', 'COLD', 'ERROR', 'DELETED')),
    operation             text NOT NULL DEFAULT 'NONE'
        CHECK (operation IN ('NONE', 'PROVISIONING', 'STARTING', 'STOPPING', 'ARCHIVING',
                             'RESTORING', 'DELETING')),
    operation_started_at  timestamptz,
    home_store_key        text,
    archive_key           text,
    archive_size          bigint,
    archive_sha256        text,
    archive_created_at    timestamptz,
    last_access_at        timestamptz NOT NULL DEFAULT now(),
    warm_ttl_seconds      integer CHECK (warm_ttl_seconds > 0),
    cold_ttl_seconds      integer CHECK (cold_ttl_seconds > 0),
    error_message         text,
    error_from_status     text,   -- the status to return to when an admin retries
    error_count           integer NOT NULL DEFAULT 0,
    error_at              timestamptz,
    next_retry_at         timestamptz,
    progress_phase        text,
    progress_done         bigint,
    progress_total        bigint,
    generation            bigint NOT NULL DEFAULT 1,
    observed_generation   bigint NOT NULL DEFAULT 0,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- TTL sweep, one partial index per tier: only settled rows of that tier are scanned.
CREATE INDEX workspaces_running_idle ON workspaces (last_access_at)
    WHERE status = 'RUNNING' AND desired_state = 'RUNNING' AND operation = 'NONE';
CREATE INDEX workspaces_warm_idle ON workspaces (last_access_at)
    WHERE status = 'WARM' AND desired_state = 'WARM' AND operation = 'NONE';

-- Resync: the rows that are not converged (or are mid-operation).
CREATE INDEX workspaces_unsettled ON workspaces (id)
    WHERE operation <> 'NONE' OR status IS DISTINCT FROM desired_state;

-- Admin listing by owner, paged by id.
CREATE INDEX workspaces_owner ON workspaces (owner, id);
