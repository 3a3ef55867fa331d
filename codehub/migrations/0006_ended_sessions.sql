-- Sign-in sessions ended by a sign-out (codehub/revocations.py), kept until they would have
-- expired anyway; every gateway refuses them.
CREATE TABLE ended_sessions (
    sid text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
