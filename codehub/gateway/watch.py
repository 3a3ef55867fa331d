"""One watcher per watched workspace: it reads the state once and fans it out to every
event stream of that workspace.

Guarantees:
- A workspace has at most one watcher, and only while it has at least one subscriber
  (an open event stream); the watcher stops when its last subscriber leaves. N streams
  on one workspace cost what one costs: one row read (`RouteTable.get`/`fresh`) and at
  most one health check per change or poll, whatever N is.
- A change is noticed through hints (`RouteTable.changed`, armed before each read, so a
  hint that arrives during a read is not lost) and, because hints are at most once and
  progress is not hinted, by reading the row again every `poll_interval` seconds.
- Every subscriber gets the latest state (the serialised JSON) at once if the watcher
  has one, and again after each change; a subscriber keeps only the latest state, so a
  slow client never stalls the fan-out nor the other subscribers (it skips the states it
  was too slow to see, never the last one).
- While the database cannot be read nothing is published (subscribers keep waiting) and
  the row is read again every `poll_interval` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import orjson

from ..model import DesiredState, Status
from ..store import StoreUnavailable
from ..view import workspace_state
from .routes import Route, RouteTable

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = 2.0
RETRY_MS = 2000  # the EventSource's reconnection delay, sent with every state
_FINAL = frozenset({Status.ERROR, Status.COLD, Status.DELETED})
_RESTORING = frozenset({DesiredState.RUNNING.value, DesiredState.WARM.value})


def is_final(state: dict[str, Any]) -> bool:
    """Nothing more will happen by itself. COLD with a restore asked for is not final: the
    self-service page follows the restore on the same stream."""
    if state["status"] == Status.COLD.value and state.get("desired_state") in _RESTORING:
        return False
    return bool(state["ready"]) or state["status"] in ("UNKNOWN", *(s.value for s in _FINAL)) \
        or state.get("desired_state") == DesiredState.DELETED.value


async def healthy(session: aiohttp.ClientSession, route: Route, path: str) -> bool:
    try:
        async with session.get(f"http://{route.host}:{route.port}{path}",
                               timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT)) as resp:
            await resp.read()
            return 200 <= resp.status < 300
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


async def read_state(routes: RouteTable, ready: Callable[[Route], Awaitable[bool]],
                     workspace_id: str, *, fresh: bool = False) -> dict[str, Any] | None:
    """The state to show, or None while the database cannot be read."""
    try:
        route = await (routes.fresh(workspace_id) if fresh else routes.get(workspace_id))
    except StoreUnavailable:
        return None
    return workspace_state(route.workspace, ready=route.proxyable and await ready(route))


def sse_frame(data: bytes) -> bytes:
    """The `state` event carrying `data` (one line of JSON), as the stream sends it."""
    return b"event: state\r\ndata: %s\r\nretry: %d\r\n\r\n" % (data, RETRY_MS)


class Subscription:
    """One stream's view of its workspace: the latest state, and whether one is new.
    `frame` is the latest state as an SSE event, built once by the watcher for all."""

    __slots__ = ("_new", "final", "frame", "latest")

    def __init__(self) -> None:
        self.latest: bytes | None = None
        self.frame = b""
        self.final = False
        self._new = asyncio.Event()

    def offer(self, data: bytes, frame: bytes, final: bool) -> None:
        self.latest = data
        self.frame = frame
        self.final = final
        self._new.set()

    async def next(self, timeout: float) -> bytes | None:
        """The latest state not yet taken, or None if none came within `timeout`."""
        if not self._new.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._new.wait()
            except TimeoutError:
                return None
        self._new.clear()
        return self.latest


class _Watcher:
    __slots__ = ("last", "subscribers", "task")

    def __init__(self) -> None:
        self.subscribers: set[Subscription] = set()
        self.last: tuple[bytes, bytes, bool] | None = None
        self.task: asyncio.Task[None] | None = None


class Watchers:
    """The registry of watchers (one per workspace with a subscriber)."""

    def __init__(self, routes: RouteTable, ready: Callable[[Route], Awaitable[bool]], *,
                 poll_interval: float) -> None:
        self.routes = routes
        self.ready = ready
        self.poll_interval = poll_interval
        self._watchers: dict[str, _Watcher] = {}

    def subscribers(self, workspace_id: str) -> int:
        watcher = self._watchers.get(workspace_id)
        return len(watcher.subscribers) if watcher is not None else 0

    def __len__(self) -> int:
        return len(self._watchers)

    @contextlib.contextmanager
    def subscribe(self, workspace_id: str) -> Iterator[Subscription]:
        sub = Subscription()
        watcher = self._watchers.get(workspace_id)
        if watcher is None:
            watcher = self._watchers[workspace_id] = _Watcher()
            watcher.task = asyncio.get_running_loop().create_task(
                self._run(workspace_id, watcher), name=f"gateway-watch-{workspace_id}")
        elif watcher.last is not None:
            sub.offer(*watcher.last)
        watcher.subscribers.add(sub)
        try:
            yield sub
        finally:
            watcher.subscribers.discard(sub)
            if not watcher.subscribers and self._watchers.get(workspace_id) is watcher:
                del self._watchers[workspace_id]
                if watcher.task is not None:
                    watcher.task.cancel()

    async def _run(self, workspace_id: str, watcher: _Watcher) -> None:
        fresh = False
        while True:
            changed = self.routes.changed(workspace_id)  # armed before the read
            try:
                state = await read_state(self.routes, self.ready, workspace_id, fresh=fresh)
            except Exception:  # never leave the subscribers without a watcher
                log.exception("watching workspace %s", workspace_id)
                state = None
            if state is None:  # database unreachable: publish nothing, try again later
                await asyncio.sleep(self.poll_interval)
                fresh = True
                continue
            data = orjson.dumps(state)
            if watcher.last is None or watcher.last[0] != data:
                watcher.last = (data, sse_frame(data), is_final(state))
                for sub in watcher.subscribers:
                    sub.offer(*watcher.last)
            # A hint invalidated the route (the next read is fresh anyway); no hint within
            # the poll interval: read the row again in case one was lost or progress moved.
            try:
                async with asyncio.timeout(self.poll_interval):
                    await changed.wait()
                fresh = False
            except TimeoutError:
                fresh = True

    async def close(self) -> None:
        tasks = [w.task for w in self._watchers.values() if w.task is not None]
        self._watchers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
