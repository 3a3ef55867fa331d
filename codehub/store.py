"""Workspace state in PostgreSQL (asyncpg).

Guarantees:
- Migrations are numbered SQL files applied in order inside one transaction that holds a
  transaction-scoped advisory lock: replicas (or `codehub migrate` runs) starting at once
  serialise, each sees the others' work, and every one of them succeeds.
- Every write that moves a workspace through its state machine is a compare-and-set: it
  names the status and operation it expects and changes nothing (returns None) when the
  row has moved on. Two writers can never both believe they won.
- Any write of desired_state or a TTL bumps `generation` and clears `next_retry_at` (a
  new intent is tried at once; the error count stays); the reconciler records the
  generation it converged in `observed_generation`.
- `flush_activity` writes any number of `last_access_at` marks in one statement and never
  moves a mark backwards.
- TTL sweeps are one indexed UPDATE each; a row touched (last_access_at moved) while the
  sweep runs is re-checked under its row lock and not stepped down.
- No call waits on the database longer than `timeout` seconds (pool acquire and query
  together, `database.statement_timeout`), and every failure of the driver raises
  `StoreUnavailable` (codehub.pool), whatever the cause: callers catch that one
  exception, never asyncpg's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from . import constants
from .model import Checkpoint, DesiredState, Operation, Status, Workspace
from .pool import DRIVER_ERRORS, BoundedPool, unavailable
from .pool import StoreUnavailable as StoreUnavailable

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The bundled migrations in version order."""
    found = []
    for entry in sorted(MIGRATIONS_DIR.iterdir()):
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations are not numbered 1..n without gaps: {versions}")
    return found


LATEST_VERSION = len(migrations())


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the missing migrations; return the versions this call applied."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", constants.MIGRATION_LOCK_ID)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())""")
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for mig in migrations():
            if mig.version in done:
                continue
            log.info("applying migration %s", mig.name)
            await conn.execute(mig.sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                               mig.version, mig.name)
            applied.append(mig.version)
    return applied


async def schema_version(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """The highest applied migration, 0 on an empty database; StoreUnavailable when the
    database cannot say."""
    try:
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        if not exists:
            return 0
        return int(await conn.fetchval(
            "SELECT coalesce(max(version), 0) FROM schema_migrations"))
    except DRIVER_ERRORS as exc:
        raise unavailable(exc) from exc


_COLUMNS = tuple(f.name for f in fields(Workspace))
_SELECT = "SELECT " + ", ".join(_COLUMNS) + " FROM workspaces"
_RETURNING = " RETURNING " + ", ".join(_COLUMNS)

# Columns a compare-and-set may change. desired_state and TTLs go through set_desired /
# set_ttls, which bump generation.
_MUTABLE = frozenset({
    "status", "operation", "operation_started_at", "home_store_key", "archive_key",
    "archive_size", "archive_sha256", "archive_created_at", "error_message",
    "error_from_status", "error_count",
    "error_at", "next_retry_at", "progress_phase", "progress_done", "progress_total",
    "observed_generation", "checkpoint",
})


def _row(rec: Mapping[str, Any]) -> Workspace:
    return Workspace(**{
        **rec,
        "desired_state": DesiredState(rec["desired_state"]),
        "status": Status(rec["status"]),
        "operation": Operation(rec["operation"]),
        "error_from_status": None if rec["error_from_status"] is None
        else Status(rec["error_from_status"]),
        "checkpoint": None if rec["checkpoint"] is None else Checkpoint(rec["checkpoint"]),
    })


# Per-workspace settings that fall back to a global default when NULL.
SETTINGS = ("warm_ttl_seconds", "cold_ttl_seconds", "home_size_limit_mib")


class AlreadyExists(Exception):
    """A workspace with this id exists."""


class OwnerLimit(Exception):
    """The owner already has `limit` workspaces that are not being deleted."""

    def __init__(self, owner: str, limit: int) -> None:
        super().__init__(f"{owner} already owns {limit} workspace(s)")
        self.limit = limit


class Store:
    """Reads and compare-and-set writes of workspace rows."""

    def __init__(self, pool: asyncpg.Pool | asyncpg.Connection, *,
                 timeout: float = 1.5) -> None:
        self.raw_pool = pool
        self.pool = BoundedPool(pool, timeout)

    async def create(
        self, *, id: str, owner: str, image_ref: str,
        desired_state: DesiredState = DesiredState.RUNNING,
        warm_ttl_seconds: int | None = None, cold_ttl_seconds: int | None = None,
        now: datetime | None = None, home_size_limit_mib: int | None = None,
    ) -> Workspace:
        try:
            rec = await self.pool.fetchrow(
                "INSERT INTO workspaces (id, owner, image_ref, desired_state, warm_ttl_seconds,"
                " cold_ttl_seconds, last_access_at, created_at, updated_at, home_size_limit_mib)"
                " VALUES ($1, $2, $3, $4, $5, $6, coalesce($7, now()), coalesce($7, now()),"
                " coalesce($7, now()), $8)" + _RETURNING,
                id, owner, image_ref, desired_state.value, warm_ttl_seconds, cold_ttl_seconds,
                now, home_size_limit_mib)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(id) from None
        assert rec is not None
        return _row(rec)

    async def create_within(self, limit: int, *, id: str, owner: str, image_ref: str,
                            desired_state: DesiredState) -> Workspace:
        """`create`, only while `owner` has fewer than `limit` workspaces not asked to be
        deleted (OwnerLimit); concurrent creations for one owner are serialised by a
        transaction-scoped advisory lock, so the limit holds across replicas."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 16))",
                               owner, timeout=self.pool.timeout)
            owned = await conn.fetchval(
                "SELECT count(*) FROM workspaces WHERE owner = $1 AND desired_state <> "
                "'DELETED'", owner, timeout=self.pool.timeout)
            if owned >= limit:
                raise OwnerLimit(owner, limit)
            return await Store(conn, timeout=self.pool.timeout).create(
                id=id, owner=owner, image_ref=image_ref, desired_state=desired_state)

    async def get(self, workspace_id: str) -> Workspace | None:
        rec = await self.pool.fetchrow(_SELECT + " WHERE id = $1", workspace_id)
        return None if rec is None else _row(rec)

    async def list_page(
        self, *, status: Status | None = None, owner: str | None = None,
        after_id: str | None = None, limit: int = 100,
    ) -> list[Workspace]:
        """Rows ordered by id; `after_id` is a keyset cursor, stable while rows change."""
        recs = await self.pool.fetch(
            _SELECT + " WHERE ($1::text IS NULL OR status = $1)"
            " AND ($2::text IS NULL OR owner = $2)"
            " AND ($3::text IS NULL OR id > $3)"
            " ORDER BY id LIMIT $4",
            None if status is None else status.value, owner, after_id, limit)
        return [_row(r) for r in recs]

    async def set_desired(
        self, workspace_id: str, desired: DesiredState, *,
        expect_status: Iterable[Status] | None = None,
        expect_operation: Iterable[Operation] | None = None,
    ) -> Workspace | None:
        """Ask for a new desired state; None when the row is gone, its status is not one
        of `expect_status` or its operation not one of `expect_operation`."""
        allowed = None if expect_status is None else [s.value for s in expect_status]
        ops = None if expect_operation is None else [o.value for o in expect_operation]
        rec = await self.pool.fetchrow(
            "UPDATE workspaces SET desired_state = $2, generation = generation + 1,"
            " next_retry_at = NULL, updated_at = now()"
            " WHERE id = $1 AND ($3::text[] IS NULL OR status = ANY($3))"
            " AND ($4::text[] IS NULL OR operation = ANY($4))"
            + _RETURNING,
            workspace_id, desired.value, allowed, ops)
        return None if rec is None else _row(rec)

    async def set_ttls(
        self, workspace_id: str, *, warm_ttl_seconds: int | None,
        cold_ttl_seconds: int | None,
    ) -> Workspace | None:
        """Replace both per-workspace TTLs (None = global default)."""
        rec = await self.pool.fetchrow(
            "UPDATE workspaces SET warm_ttl_seconds = $2, cold_ttl_seconds = $3,"
            " generation = generation + 1, updated_at = now() WHERE id = $1" + _RETURNING,
            workspace_id, warm_ttl_seconds, cold_ttl_seconds)
        return None if rec is None else _row(rec)

    async def compare_and_set(
        self, workspace_id: str, *, expect_status: Status, expect_operation: Operation,
        **changes: Any,
    ) -> Workspace | None:
        """Apply `changes` only if the row still has the expected status and operation.

        Returns the updated row, or None when the row moved on (or is gone)."""
        bad = set(changes) - _MUTABLE
        if bad:
            raise ValueError(f"not settable by compare_and_set: {sorted(bad)}")
        names = list(changes)
        values = [v.value if isinstance(v, Status | Operation) else v for v in changes.values()]
        sets = ", ".join(f"{n} = ${i + 4}" for i, n in enumerate(names))
        sql = (f"UPDATE workspaces SET {sets}{', ' if sets else ''}updated_at = now()"
               " WHERE id = $1 AND status = $2 AND operation = $3" + _RETURNING)
        rec = await self.pool.fetchrow(sql, workspace_id, expect_status.value,
                                       expect_operation.value, *values)
        return None if rec is None else _row(rec)

    async def delete_row(self, workspace_id: str, *, expect_status: Status) -> bool:
        """Remove the row if it has the expected status (DELETED after a purge)."""
        res: str = await self.pool.execute(
            "DELETE FROM workspaces WHERE id = $1 AND status = $2",
            workspace_id, expect_status.value)
        return res.endswith(" 1")

    async def flush_activity(self, ids: Sequence[str], marks: Sequence[datetime]) -> int:
        """Write a batch of activity marks in one statement; returns rows updated."""
        if not ids:
            return 0
        res: str = await self.pool.execute(
            "UPDATE workspaces AS w SET last_access_at = u.ts"
            " FROM unnest($1::text[], $2::timestamptz[]) AS u(id, ts)"
            " WHERE w.id = u.id AND w.last_access_at < u.ts",
            list(ids), list(marks))
        return int(res.rsplit(" ", 1)[1])

    async def sweep_warm(self, now: datetime, default_ttl_seconds: int) -> list[str]:
        """RUNNING rows idle past their warm TTL are asked to become WARM."""
        return await self._sweep(now, default_ttl_seconds, Status.RUNNING,
                                 DesiredState.RUNNING, DesiredState.WARM, "warm_ttl_seconds")

    async def sweep_cold(self, now: datetime, default_ttl_seconds: int) -> list[str]:
        """WARM rows idle past their cold TTL are asked to become COLD."""
        return await self._sweep(now, default_ttl_seconds, Status.WARM,
                                 DesiredState.WARM, DesiredState.COLD, "cold_ttl_seconds")

    async def _sweep(self, now: datetime, default_ttl: int, status: Status,
                     desired: DesiredState, to: DesiredState, ttl_column: str) -> list[str]:
        # States are inlined (not parameters) so the planner can match the tier's partial
        # index. Postgres re-evaluates the WHERE clause on rows updated concurrently, so a
        # last_access_at written during the sweep protects its row.
        recs = await self.pool.fetch(
            f"UPDATE workspaces SET desired_state = '{to.value}',"
            f" generation = generation + 1, updated_at = now()"
            f" WHERE status = '{status.value}' AND desired_state = '{desired.value}'"
            f" AND operation = 'NONE'"
            f" AND last_access_at < $1::timestamptz"
            f"   - make_interval(secs => coalesce({ttl_column}, $2))"
            f" RETURNING id",
            now, default_ttl)
        return [r["id"] for r in recs]

    async def resync_ids(self) -> list[str]:
        """Ids the leader looks at on every resync: rows with work to do (mid-operation or
        not at their desired state) and RUNNING rows, whose containers may have died."""
        recs = await self.pool.fetch(
            "SELECT id FROM workspaces WHERE operation <> 'NONE'"
            " OR status IS DISTINCT FROM desired_state OR status = 'RUNNING'")
        return [r["id"] for r in recs]

    async def revoke_access(self, workspace_id: str) -> Workspace | None:
        """Give the workspace a new access_nonce: every link and cookie made before stops
        working (once the gateways have the new row: one hint). None: no such row."""
        rec = await self.pool.fetchrow(
            "UPDATE workspaces SET access_nonce = replace(gen_random_uuid()::text, '-', ''),"
            " updated_at = now() WHERE id = $1" + _RETURNING, workspace_id)
        return None if rec is None else _row(rec)

    async def use_link(self, link_id: str, workspace_id: str, expires_at: datetime) -> bool:
        """Record that an access link was exchanged; False when it already had been. Rows
        of links past their expiry (by an hour: replicas' clocks differ) are removed."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM used_links WHERE expires_at < now() - interval "
                               "'1 hour'")
            return await conn.fetchval(
                "INSERT INTO used_links (link_id, workspace_id, expires_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (link_id) DO NOTHING RETURNING true",
                link_id, workspace_id, expires_at) is True

    async def all_ids(self) -> set[str]:
        return {r["id"] for r in await self.pool.fetch("SELECT id FROM workspaces")}

    async def count_by_status(self) -> dict[str, int]:
        recs = await self.pool.fetch("SELECT status, count(*) AS n FROM workspaces GROUP BY 1")
        return {r["status"]: int(r["n"]) for r in recs}

    async def update_spec(
        self, workspace_id: str, *, expect_desired: DesiredState, expect_status: Status,
        expect_operation: Operation, desired_state: DesiredState | None = None,
        ttls: Mapping[str, int | None] | None = None, touch: bool = False,
    ) -> Workspace | None:
        """Change desired_state and/or TTLs (generation bumped) only if the row still has
        the desired state, status and operation the caller validated the change against.

        `ttls` maps `warm_ttl_seconds` / `cold_ttl_seconds` / `home_size_limit_mib` (the
        per-workspace settings) to a value (None = global default); one left out keeps its
        value. `touch` also marks the workspace active
        now (its idle time restarts; never moved backwards). Returns None when the row
        moved on."""
        ttls = dict(ttls or {})
        bad = set(ttls) - set(SETTINGS)
        if bad:
            raise ValueError(f"not a per-workspace setting: {sorted(bad)}")
        args: list[Any] = [workspace_id, expect_desired.value, expect_status.value,
                           expect_operation.value]
        sets = []
        if desired_state is not None:
            args.append(desired_state.value)
            sets.append(f"desired_state = ${len(args)}")
        for column, value in ttls.items():
            args.append(value)
            sets.append(f"{column} = ${len(args)}")
        if touch:
            sets.append("last_access_at = greatest(last_access_at, now())")
        rec = await self.pool.fetchrow(
            "UPDATE workspaces SET " + ", ".join([*sets, "generation = generation + 1",
                                                  "next_retry_at = NULL",
                                                  "updated_at = now()"])
            + " WHERE id = $1 AND desired_state = $2 AND status = $3 AND operation = $4"
            + _RETURNING, *args)
        return None if rec is None else _row(rec)
