"""Leader election on a PostgreSQL session advisory lock.

Guarantees:
- The lock is taken with `pg_try_advisory_lock` on a DEDICATED connection (never a pooled
  one): the lock lives exactly as long as that session. Not safe behind a PgBouncer in
  transaction-pooling mode.
- While this replica holds the lock, `lead()` runs; at most one replica runs it at a time
  for as long as PostgreSQL keeps sessions apart.
- Leadership is lost the moment the connection fails a liveness check (or closes): `lead()`
  is cancelled at once (no fencing, as client-go: stop acting immediately), the
  connection is dropped and the replica campaigns again.
- A replica that is not leader retries every `check_interval` seconds, so when a leader
  dies (its session ends, releasing the lock) another one takes over within about
  `check_interval` plus connection time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from .. import constants, metrics

log = logging.getLogger(__name__)


class LeaderElector:
    def __init__(self, dsn: str, lead: Callable[[], Coroutine[Any, Any, None]], *,
                 check_interval: float = 2.0, lock_id: int = constants.LEADER_LOCK_ID,
                 ) -> None:
        self._dsn = dsn
        self._lead = lead
        self.check_interval = check_interval
        self.lock_id = lock_id
        self.is_leader = False
        self.elected = asyncio.Event()
        self.terms = 0  # how many times this replica became leader

    async def run(self) -> None:
        """Campaign forever (until cancelled)."""
        announced_waiting = False
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=self.check_interval * 2 + 3)
                got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.lock_id)
                if got:
                    announced_waiting = False
                    await self._hold(conn)
                elif not announced_waiting:
                    log.info("another replica is leader; standing by")
                    announced_waiting = True
            except (OSError, TimeoutError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:
                log.warning("leader election: database unavailable: %s", exc)
            finally:
                if conn is not None:
                    await _close(conn)
            await asyncio.sleep(self.check_interval)

    async def _hold(self, conn: asyncpg.Connection) -> None:
        self.is_leader = True
        metrics.LEADER.set(1)
        self.terms += 1
        self.elected.set()
        log.info("became leader (term %d)", self.terms)
        lead = asyncio.create_task(self._lead(), name="codehub-leader")
        try:
            while not lead.done():
                done, _ = await asyncio.wait({lead}, timeout=self.check_interval)
                if done:
                    break
                try:
                    await conn.fetchval("SELECT 1", timeout=self.check_interval)
                except (OSError, TimeoutError, asyncpg.PostgresError,
                        asyncpg.InterfaceError) as exc:
                    log.error("lost leadership: lock connection failed: %s", exc)
                    break
            if lead.done() and not lead.cancelled() and lead.exception() is not None:
                log.error("leader task failed; giving up leadership",
                          exc_info=lead.exception())
        finally:
            self.is_leader = False
            metrics.LEADER.set(0)
            self.elected.clear()
            lead.cancel()
            await asyncio.gather(lead, return_exceptions=True)


async def _close(conn: asyncpg.Connection) -> None:
    try:
        # Not wait_for: on 3.11 it swallows a cancel that arrives as close() finishes, and
        # a cancelled elector would then campaign on forever.
        async with asyncio.timeout(2):
            await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        conn.terminate()
