"""The route table: workspace id -> (its row, where its IDE answers), kept in memory.

Guarantees:
- A proxied request to a workspace whose route is cached costs no database query and no
  runtime lookup: one dict lookup and one clock read.
- A route is filled on demand: one `Store.get` (plus `resolve_upstream` when the row says
  RUNNING with no operation in flight); concurrent requests for the same uncached
  workspace share that one load. Loads are counted (`loads`, and the metric
  `codehub_route_loads`).
- Hints invalidate: every hint for a workspace drops its route (the next request reads
  the row again) and wakes whoever waits on it (the loading page's event stream); a
  (re)subscription, after which hints may have been missed, drops every route.
- Hints are at most once, so routes also expire: a proxyable route after `ttl` seconds,
  any other after `short_ttl`. A lost hint costs at most that much staleness, and a
  stale route to a stopped workspace shows up sooner as a refused connection, which the
  proxy answers by invalidating the route and reading the row again.
- When the database cannot be read (`StoreUnavailable`: down, refusing or not answering
  within `database.statement_timeout`), the last proxyable route read for a workspace is
  served for up to `stale_max` seconds after that read, even if a hint dropped it since:
  a database outage does not interrupt running workspaces. The first failed read of an
  outage waits at most the store's timeout; from then on, until a read succeeds, a known
  route is served at once while one re-read per workspace runs in the background. Each
  such request counts in `codehub_stale_routes_served`; `codehub_database_unavailable` is
  1 during the outage, which is logged once when it starts and once when it ends. (A
  revocation made just before an outage may therefore take up to `stale_max` to bite.)
- A workspace with no usable known route during an outage raises the store's
  `StoreUnavailable` (the handler answers 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from ..interfaces import HintBus, InstanceController
from ..metrics import DATABASE_UNAVAILABLE, ROUTE_LOADS, STALE_ROUTES_SERVED
from ..model import Operation, Status, Workspace
from ..store import Store, StoreUnavailable

log = logging.getLogger(__name__)


class Route:
    """What the gateway knows about one workspace. `host` is "" unless proxyable."""

    __slots__ = ("expires", "host", "port", "read_at", "workspace")

    def __init__(self, workspace: Workspace | None, host: str, port: int,
                 expires: float, read_at: float = 0.0) -> None:
        self.workspace = workspace
        self.host = host
        self.port = port
        self.expires = expires
        self.read_at = read_at  # monotonic time of the database read behind it

    @property
    def proxyable(self) -> bool:
        return bool(self.host)


class RouteTable:
    def __init__(self, store: Store, instances: InstanceController, *, ttl: float,
                 short_ttl: float = 1.0, stale_max: float = 300.0) -> None:
        self.store = store
        self.instances = instances
        self.ttl = ttl
        self.short_ttl = short_ttl
        self.stale_max = stale_max
        self._routes: dict[str, Route] = {}
        # The last proxyable route read per workspace, kept through hints: served only
        # while the database cannot be read.
        self._known: dict[str, Route] = {}
        self.down = False  # the last read failed because the database is unavailable
        self._stale_served = 0
        self._loading: dict[str, asyncio.Task[Route]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self.loads = 0  # database reads made: tests assert the hot path makes none

    def cached(self, workspace_id: str) -> Route | None:
        """The route if it is cached and fresh (the hot path), else None."""
        route = self._routes.get(workspace_id)
        if route is not None and route.expires > time.monotonic():
            return route
        return None

    async def get(self, workspace_id: str) -> Route:
        route = self.cached(workspace_id)
        if route is not None:
            return route
        task = self._loading.get(workspace_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(workspace_id))
            self._loading[workspace_id] = task
            task.add_done_callback(lambda t: self._loaded(workspace_id, t))
        if self.down:
            stale = self._stale(workspace_id, time.monotonic())
            if stale is not None:
                self._served_stale()
                return stale
        return await asyncio.shield(task)

    def _stale(self, workspace_id: str, now: float) -> Route | None:
        known = self._known.get(workspace_id)
        if known is None or now - known.read_at > self.stale_max:
            return None
        return known

    def _served_stale(self) -> None:
        self._stale_served += 1
        STALE_ROUTES_SERVED.inc()

    async def fresh(self, workspace_id: str) -> Route:
        """Read the row again now (the cached route is replaced; waiters are not woken)."""
        self._routes.pop(workspace_id, None)
        self._loading.pop(workspace_id, None)
        return await self.get(workspace_id)

    def _loaded(self, workspace_id: str, task: asyncio.Task[Route]) -> None:
        if self._loading.get(workspace_id) is not task:
            return  # invalidated while loading: the result may predate the hint
        del self._loading[workspace_id]
        if not task.cancelled() and task.exception() is None:
            self._routes[workspace_id] = task.result()

    async def _load(self, workspace_id: str) -> Route:
        self.loads += 1
        ROUTE_LOADS.inc()
        now = time.monotonic()
        try:
            ws = await self.store.get(workspace_id)
        except StoreUnavailable as exc:
            self._outage(exc)
            now = time.monotonic()
            old = self._stale(workspace_id, now)
            if old is not None:
                self._served_stale()
                # retried after short_ttl (in the background while the outage lasts)
                return Route(old.workspace, old.host, old.port, now + self.short_ttl,
                             old.read_at)
            raise
        self._recovered()
        if ws is None or ws.status is not Status.RUNNING or ws.operation is not Operation.NONE:
            self._known.pop(workspace_id, None)
            return Route(ws, "", 0, now + self.short_ttl, now)
        try:
            info = await self.instances.resolve_upstream(workspace_id)
        except Exception as exc:  # any runtime failure: not reachable (yet); retry soon
            log.info("workspace %s is RUNNING but has no upstream yet: %s", workspace_id, exc)
            self._known.pop(workspace_id, None)
            return Route(ws, "", 0, now + self.short_ttl, now)
        route = Route(ws, info.host, info.port, now + self.ttl, now)
        self._known[workspace_id] = route
        return route

    def _outage(self, exc: BaseException) -> None:
        if not self.down:
            self.down = True
            self._stale_served = 0
            DATABASE_UNAVAILABLE.set(1)
            log.warning("database unavailable (%s): serving running workspaces from their last "
                        "known routes for up to %gs; other requests get 503",
                        exc or type(exc).__name__, self.stale_max)

    def _recovered(self) -> None:
        if self.down:
            self.down = False
            DATABASE_UNAVAILABLE.set(0)
            log.info("database available again; %d request(s) were served from stale routes",
                     self._stale_served)

    def invalidate(self, workspace_id: str) -> None:
        self._routes.pop(workspace_id, None)
        self._loading.pop(workspace_id, None)
        event = self._changed.pop(workspace_id, None)
        if event is not None:
            event.set()

    def clear(self) -> None:
        self._routes.clear()
        self._loading.clear()
        for event in self._changed.values():
            event.set()
        self._changed.clear()

    def prune(self) -> None:
        """Forget expired routes (housekeeping; keeps the table the size of the active set)."""
        now = time.monotonic()
        for wid in [w for w, r in self._routes.items() if r.expires <= now]:
            del self._routes[wid]
        for wid in [w for w, r in self._known.items() if now - r.read_at > self.stale_max]:
            del self._known[wid]

    def changed(self, workspace_id: str) -> asyncio.Event:
        """An event set by the next hint about the workspace (or a resubscription)."""
        event = self._changed.get(workspace_id)
        if event is None:
            event = self._changed[workspace_id] = asyncio.Event()
        return event

    async def wait_changed(self, workspace_id: str, timeout: float) -> bool:
        """Wait for a hint about the workspace, at most `timeout` seconds; True if one came."""
        event = self.changed(workspace_id)
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False

    async def consume_hints(self, hints: HintBus,
                            on_hint: Callable[[str | None], None] | None = None) -> None:
        """Invalidate routes as hints arrive, then tell `on_hint` (the workspace's id, or
        None after a resubscription: any may have changed); runs until cancelled."""
        async for workspace_id in hints.subscribe():
            if workspace_id is None:
                self.clear()
            else:
                self.invalidate(workspace_id)
            if on_hint is not None:
                on_hint(workspace_id)

    async def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self._loading.clear()
