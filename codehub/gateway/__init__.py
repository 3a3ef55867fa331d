"""The gateway: everything under /w/{workspace_id}/ (DESIGN.md "Gateway hot path").

Modules, one concept each: `routes` (route table + hint consumer), `upstream` (pooled
HTTP/1.1 connections to workspaces), `proxy` (HTTP), `websocket` (relay), `auth` (access
links and cookies), `activity` (marks + batched flush), `pages` (loading, COLD, error),
`events` (SSE), `handler` (what each request gets), `links` (minting access links).

Wiring (app.py): after the cleanup contexts that provide keys.CONFIG, keys.STORE,
keys.HINTS and the InstanceController, call `setup(app, instances=<its AppKey>)`. It adds
the routes and one cleanup context that owns the gateway's resources: the upstream pool
and client session, the hint-consumer task, the activity flusher (flushed once more at
shutdown) and a housekeeping task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from .. import keys
from ..interfaces import InstanceController
from . import links
from .auth import load_keys
from .handler import Gateway
from .pages import Pages, static_dir

log = logging.getLogger(__name__)

GATEWAY = web.AppKey("gateway", Gateway)
HOUSEKEEPING_INTERVAL = 2.0


async def _workspace(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].handle(request, request.match_info["wid"])


async def _redirect(request: web.Request) -> web.Response:
    qs = request.query_string
    location = f"/w/{request.match_info['wid']}/" + (f"?{qs}" if qs else "")
    return web.Response(status=308, headers={"Location": location})


def gateway_ctx(instances: web.AppKey[InstanceController],
                ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        cfg = app[keys.CONFIG]
        gw = Gateway(cfg, app[keys.STORE], app[keys.HINTS], app[instances], load_keys(cfg),
                     Pages(static_dir(cfg.gateway.static_dir)))
        app[GATEWAY] = gw
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(gw.routes.consume_hints(gw.hints), name="gateway-hints"),
            loop.create_task(gw.activity.run(), name="gateway-activity"),
            loop.create_task(_housekeeping(gw), name="gateway-housekeeping"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await gw.activity.flush()
            await gw.close()
    return ctx


async def _housekeeping(gw: Gateway) -> None:
    while True:
        await asyncio.sleep(HOUSEKEEPING_INTERVAL)
        gw.housekeeping()


def setup(app: web.Application, *, instances: web.AppKey[InstanceController],
          access_links: bool = True) -> None:
    """Add the gateway's routes and its cleanup context to `app`. `access_links=False`
    leaves POST /api/v1/workspaces/{id}/access-links to the admin API."""
    app.cleanup_ctx.append(gateway_ctx(instances))
    app.router.add_route("*", "/w/{wid}", _redirect)
    app.router.add_route("*", "/w/{wid}/{tail:.*}", _workspace)
    if access_links:
        links.setup(app)
