"""Revoked sign-in sessions, per person, shared by every replica through PostgreSQL.

Guarantees:
- `revoke(person, at)` records that no session of `person` issued before `at` is valid
  any more (one row per person, `session_revocations`, migration 0005; a later revocation
  only moves the time forward, never back). It is what the admin API calls.
- `end_session(sid, expires_at)` records one signed-out session (`ended_sessions`,
  migration 0006) until it would have expired; `ended()` lists those not expired yet.
- `since(horizon)` returns every revocation newer than `horizon` (older ones cannot
  matter: no session lives longer than auth.oidc.session_ttl). The gateway reads it every
  REFRESH seconds, so a revoked session is refused everywhere within that time; reading
  costs one small query per replica per interval, never one per request.
"""

from __future__ import annotations

from datetime import datetime

from .store import Store

REFRESH = 5.0


async def revoke(store: Store, person: str, at: datetime) -> datetime:
    """Record the revocation; the time in force afterwards."""
    value = await store.pool.fetchval(
        "INSERT INTO session_revocations (person, not_before) VALUES ($1, $2) "
        "ON CONFLICT (person) DO UPDATE SET not_before = "
        "greatest(session_revocations.not_before, excluded.not_before) RETURNING not_before",
        person, at)
    assert isinstance(value, datetime)
    return value


async def since(store: Store, horizon: datetime) -> dict[str, datetime]:
    rows = await store.pool.fetch(
        "SELECT person, not_before FROM session_revocations WHERE not_before > $1", horizon)
    return {r["person"]: r["not_before"] for r in rows}


async def end_session(store: Store, sid: str, expires_at: datetime) -> None:
    await store.pool.execute(
        "INSERT INTO ended_sessions (sid, expires_at) VALUES ($1, $2) "
        "ON CONFLICT (sid) DO NOTHING", sid, expires_at)


async def ended(store: Store, now: datetime) -> dict[str, datetime]:
    """Signed-out sessions that have not expired; expired records are deleted."""
    await store.pool.execute("DELETE FROM ended_sessions WHERE expires_at < $1", now)
    rows = await store.pool.fetch("SELECT sid, expires_at FROM ended_sessions")
    return {r["sid"]: r["expires_at"] for r in rows}
