-- Per person, the earliest issue time a sign-in session may have (codehub/revocations.py):
-- set by POST /api/v1/people/{person}/revoke-sessions, read by every gateway.
CREATE TABLE session_revocations (
    person text PRIMARY KEY,
    not_before timestamptz NOT NULL
);
