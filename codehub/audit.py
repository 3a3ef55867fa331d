"""The audit log: who did what to which workspace, when, and with what result.

Guarantees:
- `AuditLog.record` appends one row to `audit_log` (migration 0004): the actor, the action
  (the API operation's name, e.g. `patchWorkspace`), the workspace id when there is one,
  the HTTP status answered, the request id, and `detail`: the validated request body
  (desired state, TTLs, owner, image, sizes: nothing secret is ever in an API body). CodeHub
  never updates or deletes a row.
- An actor never contains a secret: an admin token is named `token:` and the first 12 hex
  digits of its SHA-256 (`token_actor`), which identifies which configured token was used
  without revealing it; the token-less loopback mode is `loopback`.
- A record is written after the call answered (so its result is known), in the same
  bounded store call as every other query (database.statement_timeout). An entry that
  cannot be written (the database went away), or whose call was answered 503 because the
  database is away (no second wait), is logged at WARNING, whole, so it is not lost from
  the operator's view; the call's answer is not changed by it. Only authenticated calls
  are recorded (a refused one is counted in the metrics, not stored: strangers cannot
  fill the table), and reading the log itself is not recorded.
- `page` lists newest first, filtered by workspace or actor, with an integer keyset cursor
  (the last id seen): rows added while a client pages never make it see one twice.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from .store import Store, StoreUnavailable

log = logging.getLogger(__name__)


def token_actor(token: str) -> str:
    """The actor name of an admin token: not the token, but which one it was."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


LOOPBACK_ACTOR = "loopback"


@dataclass(frozen=True, slots=True)
class Entry:
    actor: str
    action: str
    workspace_id: str | None
    status: int
    request_id: str
    detail: dict[str, Any]
    id: int = 0
    at: datetime | None = None


class AuditLog:
    """The audit_log table, through the store's bounded pool."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def record(self, entry: Entry) -> None:
        if entry.status == 503:  # the API's 503: the database is known to be away
            self._lost(entry, "the database is unavailable")
            return
        try:
            await self.store.pool.execute(
                "INSERT INTO audit_log (actor, action, workspace_id, status, request_id, "
                "detail) VALUES ($1, $2, $3, $4, $5, $6::jsonb)", entry.actor, entry.action,
                entry.workspace_id, entry.status, entry.request_id,
                orjson.dumps(entry.detail).decode())
        except (StoreUnavailable, OSError) as exc:
            self._lost(entry, str(exc) or type(exc).__name__)

    @staticmethod
    def _lost(entry: Entry, why: str) -> None:
        log.warning("audit: not recorded (%s): %s on %s by %s, status %d, request %s, "
                    "detail %s", why, entry.action, entry.workspace_id or "-", entry.actor,
                    entry.status, entry.request_id, orjson.dumps(entry.detail).decode())

    async def page(self, *, before_id: int | None, limit: int, workspace_id: str | None = None,
                   actor: str | None = None) -> list[Entry]:
        rows = await self.store.pool.fetch(
            "SELECT id, at, actor, action, workspace_id, status, request_id, detail::text "
            "AS detail FROM audit_log WHERE ($1::bigint IS NULL OR id < $1) "
            "AND ($2::text IS NULL OR workspace_id = $2) AND ($3::text IS NULL OR actor = $3) "
            "ORDER BY id DESC LIMIT $4", before_id, workspace_id, actor, limit)
        return [Entry(actor=r["actor"], action=r["action"], workspace_id=r["workspace_id"],
                      status=r["status"], request_id=r["request_id"],
                      detail=orjson.loads(r["detail"]), id=r["id"], at=r["at"])
                for r in rows]
