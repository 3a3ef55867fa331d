"""The store's connection pool: every call bounded in time, every driver failure one error.

Guarantees:
- No call waits longer than `timeout` seconds, pool acquire and query together: a
  database that is down, refuses connections or has stopped answering (frozen,
  partitioned) raises `StoreUnavailable` within that time.
- Every other error the driver or the server reports (a server-side statement timeout,
  a serialization failure, a query the server refused) also raises `StoreUnavailable`,
  except constraint violations, which the store's methods answer (AlreadyExists).
- A connection whose call failed as "unavailable" or was cancelled mid-query is closed,
  never reset and reused (a reset would wait on the same dead server); after any other
  driver error it is still good and goes back to the pool.
- `StoreUnavailable` is a `ConnectionError`, so code that treats OSError as "database
  unreachable" keeps doing so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg


class StoreUnavailable(ConnectionError):
    """The database failed a call: down, refusing, frozen past the store's timeout, or the
    driver reported any other error. The one exception a caller of the store catches for
    "the database cannot answer now" (every such caller answers 503 or retries later);
    no module above the store names asyncpg's exceptions (tests/test_architecture.py)."""


# What "the database is unavailable" looks like from asyncpg: connection failures, a
# connection lost mid-query, a server shutting down or starting, our own timeout.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError)
# Besides those, every other error the driver or the server reports (a statement timeout
# on the server, a serialization failure...) also leaves the store as StoreUnavailable,
# but leaves the connection in use: it is still good. Constraint violations are the
# exception: the store's methods answer them (AlreadyExists).
_ANSWERED = asyncpg.IntegrityConstraintViolationError
DRIVER_ERRORS: tuple[type[BaseException], ...] = (*UNAVAILABLE, asyncpg.PostgresError)


class BoundedPool:
    """The part of asyncpg.Pool the store uses, each call bounded by `timeout`."""

    def __init__(self, pool: asyncpg.Pool | asyncpg.Connection, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        if isinstance(self.pool, asyncpg.Connection):  # a Store on one connection (tests)
            try:
                yield self.pool
            except UNAVAILABLE as exc:
                raise unavailable(exc) from exc
            return
        try:
            async with asyncio.timeout(self.timeout):
                conn = await self.pool.acquire()
        except UNAVAILABLE as exc:
            raise unavailable(exc) from exc
        try:
            yield conn
        except UNAVAILABLE as exc:
            await self._drop(conn)
            conn = None
            raise unavailable(exc) from exc
        except _ANSWERED:
            raise
        except asyncpg.PostgresError as exc:
            raise unavailable(exc) from exc
        except asyncio.CancelledError:  # e.g. our own deadline, mid-query
            await self._drop(conn)
            conn = None
            raise
        finally:
            if conn is not None:
                await self._release(conn)

    async def _release(self, conn: asyncpg.Connection) -> None:
        try:
            await self.pool.release(conn, timeout=self.timeout)
        except Exception:  # a reset that failed or hung: the connection is not reused
            conn.terminate()

    async def _drop(self, conn: asyncpg.Connection) -> None:
        # Never reset a connection whose query timed out or failed mid-way (the reset
        # would wait on the same dead server): close it, and hand its slot back.
        conn.terminate()
        with contextlib.suppress(Exception):  # terminated already; the pool replaces it
            await self.pool.release(conn, timeout=self.timeout)

    async def _call(self, method: str, query: str, args: tuple[Any, ...]) -> Any:
        try:
            async with asyncio.timeout(self.timeout), self.acquire() as conn:
                return await getattr(conn, method)(query, *args, timeout=self.timeout)
        except _ANSWERED:
            raise
        except DRIVER_ERRORS as exc:
            raise unavailable(exc) from exc

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._call("fetch", query, args)  # type: ignore[no-any-return]

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        return await self._call("fetchrow", query, args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._call("fetchval", query, args)

    async def execute(self, query: str, *args: Any) -> str:
        return await self._call("execute", query, args)  # type: ignore[no-any-return]


def unavailable(exc: BaseException) -> StoreUnavailable:
    if isinstance(exc, StoreUnavailable):
        return exc
    return StoreUnavailable(f"database unavailable: {str(exc) or type(exc).__name__}")
