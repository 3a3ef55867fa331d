"""The gateway: everything under /w/{workspace_id}/ (ARCHITECTURE.md "Gateway hot path").

Modules, one concept each: `routes` (route table + hint consumer), `upstream` (pooled
HTTP/1.1 connections to workspaces), `busypoll` (the loop polls a moment after proxy work
instead of sleeping), `proxy` (HTTP), `websocket` (relay), `auth` (cookie
names and headers), `access` (the workspace cookie checked, a link redeemed), `activity`
(marks + batched flush), `pages` (loading, COLD, error), `events` (SSE, and its limits),
`watch` (one watcher per workspace feeding all its event streams), `handler` (what each
request gets), `idle` (which relayed WebSocket bytes a person caused), `presence` (the
workbench's script and its activity endpoint), `peers` (who the client is behind trusted
proxies), and with `[auth.oidc]`: `oidc` (the relying party), `sessions` (signed session
and flow cookies), `signin` (the sign-in routes), `selfservice` (the page at / and its
JSON calls). Access links are minted by the admin API; links and cookies are signed by
codehub/signing.py; where a workspace is served (path mode or an origin of its own) is
codehub/origins.py.

In host mode (gateway.workspace_host) a middleware sends every request for a workspace's
origin to the gateway before routing; `/w/{id}/...` on the main origin redirects (308) to
the workspace's origin, path and query kept.

Wiring (app.py): after the cleanup contexts that provide keys.CONFIG, keys.STORE,
keys.HINTS and the InstanceController, call `setup(app, instances=<its AppKey>)` (and
`clock=` a Clock, the system's by default: every wall-clock read of the gateway is
its). It adds the routes and one cleanup context that owns the gateway's resources: the
upstream pool and client session, the hint-consumer task, the event-stream watchers, the
activity flusher (flushed once more at shutdown) and a housekeeping task. With
`[auth.oidc]` the context also makes the sign-in and self-service states (signin.SIGNIN,
selfservice.SELF_SERVICE): their routes read those, never the Gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from .. import keys, revocations
from ..clock import Clock, SystemClock
from ..interfaces import InstanceController
from ..model import WORKSPACE_ID
from ..origins import HostKind, Origins
from ..signing import load_keys
from ..store import StoreUnavailable
from . import selfservice, signin
from .handler import MAX_ID_LENGTH, Gateway
from .oidc import OidcClient
from .pages import Pages, plain, static_dir
from .sessions import Scope, Signer

log = logging.getLogger(__name__)

GATEWAY = web.AppKey("gateway", Gateway)
HOUSEKEEPING_INTERVAL = 2.0
_API_PREFIX = "/api/v1/"


async def _workspace(request: web.Request) -> web.StreamResponse:
    """/w/{id}/... in path mode: the workspace; in host mode: a redirect to its origin."""
    gw = request.app[GATEWAY]  # the app setup() added this route to (no ChainMap built)
    workspace_id = request.match_info["wid"]
    raw = request.raw_path
    n = 3 + len(workspace_id)
    # Only the canonical spelling of /w/{id}/ is served: the id as sent must be the id the
    # router matched (no %-encoded or dot-segment variants).
    if (len(workspace_id) > MAX_ID_LENGTH or not raw.startswith(workspace_id, 3)
            or raw[n:n + 1] != "/"):
        return plain(404, "Not found.")
    if gw.origins.host_mode:
        if not WORKSPACE_ID.fullmatch(workspace_id):
            return plain(404, "Not found.")
        return _moved(gw.origins.workspace_origin(workspace_id) + raw[n:])
    return await gw.handle(request, workspace_id, raw[n:])


async def _redirect(request: web.Request) -> web.Response:
    qs = request.query_string
    wid = request.match_info["wid"]
    location = f"/w/{wid}/" + (f"?{qs}" if qs else "")
    gw = request.config_dict[GATEWAY]
    if gw.origins.host_mode and WORKSPACE_ID.fullmatch(wid):
        location = gw.origins.workspace_origin(wid) + "/" + (f"?{qs}" if qs else "")
    return _moved(location)


def _moved(location: str) -> web.Response:
    # no-store and no-referrer: an access link's URL is never cached nor leaked onwards.
    return web.Response(status=308, headers={
        "Location": location, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


@web.middleware
async def _by_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host mode: a request for a workspace origin goes to that workspace, whatever its
    path (CodeHub's API is not there: /api/v1/... is 404); one for the main origin goes
    to the router; any other Host is 404. No database is read to decide."""
    gw = request.config_dict[GATEWAY]
    kind, workspace_id = gw.origins.classify(request.headers.get("Host"))
    if kind is HostKind.MAIN:
        return await handler(request)
    target = request.raw_path
    if kind is not HostKind.WORKSPACE or not target.startswith("/") or target.startswith(
            _API_PREFIX):
        return plain(404, "Not found.")
    return await gw.handle(request, workspace_id, target)


def gateway_ctx(instances: web.AppKey[InstanceController], clock: Clock,
                ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        cfg = app[keys.CONFIG]
        gw = Gateway(cfg, app[keys.STORE], app[keys.HINTS], app[instances], load_keys(cfg),
                     Pages(static_dir(cfg.gateway.static_dir)), clock)
        app[GATEWAY] = gw
        # The provider is reached over verified TLS: not through gw.session (workspaces).
        idp = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) if (
            cfg.auth.oidc.enabled) else None
        if idp is not None:
            gw.signin = _sign_in_states(app, gw, idp)
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(gw.routes.consume_hints(gw.hints, gw.recheck_sockets),
                             name="gateway-hints"),
            loop.create_task(gw.activity.run(), name="gateway-activity"),
            loop.create_task(_housekeeping(gw), name="gateway-housekeeping"),
        ]
        if gw.signin is not None:
            tasks.append(loop.create_task(_revocations(gw, gw.signin.signer),
                                          name="gateway-session-revocations"))
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
            if idp is not None:
                await idp.close()
    return ctx


def _sign_in_states(app: web.Application, gw: Gateway, idp: aiohttp.ClientSession,
                    ) -> signin.SignIn:
    """The sign-in and self-service states (under their app keys), sharing the gateway's
    store, keys, origins, pages, watchers and limits."""
    now = gw.clock.time
    si = signin.SignIn(
        client=OidcClient(gw.cfg.auth.oidc, idp, now), signer=Signer(gw.keys, now),
        scope=Scope.of(gw.origins.host_mode, gw.public_https), store=gw.store, keys=gw.keys,
        origins=gw.origins, public_https=gw.public_https, pages=gw.pages,
        db_unavailable=gw.db_unavailable, now=now)
    app[signin.SIGNIN] = si
    app[selfservice.SELF_SERVICE] = selfservice.SelfService(
        signin=si, cfg=gw.cfg, hints=gw.hints, watchers=gw.watchers,
        stream_slots=gw.stream_slots, peers=gw.peers)
    return si


async def _revocations(gw: Gateway, signer: Signer) -> None:
    """Session revocations and ended sessions (revocations.py) into the signer's in-memory
    tables, every
    revocations.REFRESH seconds; a database outage keeps the table as it was."""
    horizon = gw.cfg.auth.oidc.session_ttl + 60
    failing = False
    while True:
        now = gw.clock.now()
        try:
            found = await revocations.since(gw.store, now - timedelta(seconds=horizon))
            ended = await revocations.ended(gw.store, now)
        except (StoreUnavailable, OSError) as exc:
            if not failing:
                log.warning("gateway: session revocations unreadable (%s); keeping the "
                            "known ones", exc or type(exc).__name__)
            failing = True
        else:
            failing = False
            for person, at in found.items():
                signer.not_before.revoke(person, int(at.timestamp()))
            for sid, until in ended.items():
                signer.ended.end(sid, int(until.timestamp()))
            signer.ended.prune(now.timestamp())
        await asyncio.sleep(revocations.REFRESH)


async def _housekeeping(gw: Gateway) -> None:
    while True:
        await asyncio.sleep(HOUSEKEEPING_INTERVAL)
        gw.housekeeping()


def setup(app: web.Application, *, instances: web.AppKey[InstanceController],
          clock: Clock | None = None) -> None:
    """Add the gateway's routes and its cleanup context to `app` (the admin API, mounted
    apart, mints the access links)."""
    app.cleanup_ctx.append(gateway_ctx(instances, clock or SystemClock()))
    cfg = app[keys.CONFIG]
    if cfg.gateway.workspace_host:
        app.middlewares.append(_by_host)
        log.info("gateway: host mode: each workspace at its own origin, %s",
                 Origins(cfg.server.public_url, cfg.gateway.workspace_host)
                 .workspace_origin("{id}"))
    else:
        log.warning("gateway: path mode: every workspace is served from one origin under "
                    "/w/{id}/, so a page one workspace serves can read and act on the others "
                    "through its user's browser; set gateway.workspace_host to give each "
                    "workspace an origin of its own (needed for more than one user)")
    app.router.add_route("*", "/w/{wid}", _redirect)
    app.router.add_route("*", "/w/{wid}/{tail:.*}", _workspace)
    if cfg.auth.oidc.enabled:
        signin.setup(app)
        selfservice.setup(app)
        log.info("gateway: sign-in with OpenID Connect at %s", cfg.auth.oidc.issuer)
