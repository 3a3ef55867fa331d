"""The loading page's live view of a workspace: an SSE stream and a JSON status endpoint.

`GET /w/{id}/_codehub/events` (text/event-stream, aiohttp-sse):
- sends a `state` event at once and after every change: `{id, status, desired_state,
  operation, progress: {phase, done, total} | null, error: {message, count, at} | null,
  ready}`; changes are noticed through hints and, because hints are at most once and
  progress is not hinted, by reading the row every gateway.events_poll_interval;
- `ready` is true only when the workspace is RUNNING with no operation AND its health
  check (docker.health_path) answers 2xx through the gateway's own network path;
- the stream ends after a final state (ready, ERROR, COLD, unknown or being deleted) and
  at the latest after MAX_STREAM seconds (the browser's EventSource then reconnects);
- keep-alive comments (`: ping`) flow every PING_INTERVAL seconds while nothing changes.

`GET /w/{id}/_codehub/status` answers the same JSON once: the page's polling fallback.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp_sse import sse_response

from ..model import DesiredState, Status
from .pages import describe
from .routes import DatabaseUnavailable, Route

if TYPE_CHECKING:
    from .handler import Gateway

PING_INTERVAL = 10.0
MAX_STREAM = 300.0
HEALTH_TIMEOUT = 2.0
RETRY_MS = 2000
_FINAL = frozenset({Status.ERROR, Status.COLD, Status.DELETED})


def is_final(state: dict[str, Any]) -> bool:
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


async def current_state(gw: Gateway, workspace_id: str, *, fresh: bool = False,
                        ) -> dict[str, Any] | None:
    """The state to show, or None while the database cannot be read."""
    try:
        route = await (gw.routes.fresh(workspace_id) if fresh
                       else gw.routes.get(workspace_id))
    except DatabaseUnavailable:
        return None
    ready = route.proxyable and await healthy(gw.session, route, gw.health_path)
    return describe(route.workspace, ready=ready)


def _connected(request: web.Request, resp: web.StreamResponse) -> bool:
    transport = request.transport
    return (transport is not None and not transport.is_closing()
            and getattr(resp, "is_connected", lambda: True)())


async def status(gw: Gateway, request: web.Request, workspace_id: str) -> web.Response:
    state = await current_state(gw, workspace_id)
    if state is None:
        return web.Response(status=503, text="database unavailable\n",
                            headers={"Cache-Control": "no-store", "Retry-After": "2"})
    return web.Response(body=orjson.dumps(state), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


async def events(gw: Gateway, request: web.Request, workspace_id: str) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MAX_STREAM
    async with sse_response(request, ping_interval=PING_INTERVAL,
                            headers={"Cache-Control": "no-store"}) as resp:
        last: bytes | None = None
        fresh = False
        while _connected(request, resp) and loop.time() < deadline:
            state = await current_state(gw, workspace_id, fresh=fresh)
            if state is None:  # database unreachable: keep the stream, try again later
                await asyncio.sleep(gw.events_poll_interval)
                fresh = True
                continue
            data = orjson.dumps(state)
            if data != last:
                await resp.send(data.decode(), event="state", retry=RETRY_MS)
                last = data
            if is_final(state):
                break
            # A hint invalidated the route (the next read is fresh anyway); no hint within
            # the poll interval: read the row again in case one was lost or progress moved.
            fresh = not await gw.routes.wait_changed(workspace_id, gw.events_poll_interval)
    return resp
