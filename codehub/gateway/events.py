"""The loading page's live view of a workspace: an SSE stream and a JSON status endpoint.

Guarantees:
- `GET /w/{id}/_codehub/events` (text/event-stream, aiohttp-sse) sends a `state` event
  at once and after every change: `{id, status, desired_state, operation,
  progress: {phase, done, total} | null, error: {message, count, at} | null, ready}`.
  The states come from the workspace's one watcher (watch.py), shared by all its
  streams: N streams on a workspace cost one row read per change or
  gateway.events_poll_interval, not N.
- `ready` is true only when the workspace is RUNNING with no operation AND its health
  check (docker.health_path) answers 2xx through the gateway's own network path.
- The stream ends after a final state (ready, ERROR, COLD with no restore asked for,
  unknown or being deleted) and
  at the latest after MAX_STREAM seconds (the browser's EventSource then reconnects);
  keep-alive comments (`: ping`) flow every PING_INTERVAL seconds while nothing changes;
  while the database cannot be read the stream stays open and sends nothing new.
- At most gateway.events_per_workspace streams per workspace and
  gateway.events_per_client per client address are open at once. One more is answered
  429 with a JSON body naming the limit and Retry-After, before the stream is opened or
  anything is read (the loading page then polls the status endpoint).

`GET /w/{id}/_codehub/status` answers the same JSON once: the page's polling fallback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp_sse import sse_response

from ..metrics import EVENT_STREAMS, EVENT_STREAMS_REFUSED
from .limits import Slots
from .routes import Route, RouteTable
from .watch import Watchers, read_state

PING_INTERVAL = 10.0
MAX_STREAM = 300.0
SEND_TIMEOUT = 120.0  # a client that takes no data for this long is cut off
LIMITED_RETRY_AFTER = 10


def too_many(limit: str, slots: Slots) -> web.Response:
    EVENT_STREAMS_REFUSED.labels(limit).inc()
    most = slots.per_workspace if limit == "workspace" else slots.per_client
    where = "this workspace" if limit == "workspace" else "your address"
    body = {"error": "too_many_event_streams", "limit": limit, "max": most,
            "message": f"Too many event streams open for {where} (at most {most}); "
                       f"poll the status endpoint or retry later."}
    return web.Response(status=429, body=orjson.dumps(body), content_type="application/json",
                        headers={"Cache-Control": "no-store",
                                 "Retry-After": str(LIMITED_RETRY_AFTER)})


def _connected(request: web.Request, resp: web.StreamResponse) -> bool:
    transport = request.transport
    return (transport is not None and not transport.is_closing()
            and getattr(resp, "is_connected", lambda: True)())


async def status(routes: RouteTable, ready: Callable[[Route], Awaitable[bool]],
                 workspace_id: str) -> web.Response:
    state = await read_state(routes, ready, workspace_id)
    if state is None:
        return web.Response(status=503, text="database unavailable\n",
                            headers={"Cache-Control": "no-store", "Retry-After": "2"})
    return web.Response(body=orjson.dumps(state), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


async def events(request: web.Request, workspace_id: str, watchers: Watchers,
                 slots: Slots, client: str) -> web.StreamResponse:
    refused = slots.take(workspace_id, client)
    if refused is not None:
        return too_many(refused, slots)
    EVENT_STREAMS.inc()
    try:
        return await _stream(request, workspace_id, watchers)
    finally:
        EVENT_STREAMS.dec()
        slots.give(workspace_id, client)


async def _stream(request: web.Request, workspace_id: str, watchers: Watchers,
                  ) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MAX_STREAM
    async with sse_response(request, ping_interval=PING_INTERVAL,
                            headers={"Cache-Control": "no-store"}) as resp:
        with watchers.subscribe(workspace_id) as sub:
            while _connected(request, resp):
                left = deadline - loop.time()
                if left <= 0:
                    break
                # Wake at least every PING_INTERVAL to notice a client that went away.
                data = await sub.next(min(left, PING_INTERVAL))
                if data is None:
                    continue
                final = sub.final
                # The event as the watcher built it once for every stream (what
                # resp.send would build again per stream), with send()'s stall guard.
                try:
                    async with asyncio.timeout(SEND_TIMEOUT):
                        await resp.write(sub.frame)
                except TimeoutError:
                    if request.transport is not None:
                        request.transport.abort()
                    break
                except ConnectionResetError:  # the client went away
                    break
                if final:
                    break
    return resp
