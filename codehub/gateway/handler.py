"""What a request for a workspace gets: checks, then the IDE, a state page, or a refusal.

A workspace's root is `/w/{id}/` in path mode and `/` of its own origin in host mode
(codehub/origins.py); below, `<root>` is that.

Guarantees (ARCHITECTURE.md "What a browser sees at /w/{id}/"):
- `/w/{id}` redirects to `/w/{id}/` (query kept); in host mode both redirect to the
  workspace's origin.
- A WebSocket upgrade or a state-changing request that a browser sent from another origin
  (`Origin` not the workspace's own, or `Sec-Fetch-Site` not same-origin/none) is refused
  with 403 before anything else, and never reaches the workspace (`cross_site`).
- `?access=<link token>` on a GET is exchanged, once, for the workspace cookie (HttpOnly,
  SameSite=Lax, Path=<root>, host-only; `__Host-` prefixed on HTTPS in host mode; Secure
  when the request came over HTTPS or `server.public_url` is https, i.e. TLS ends at a
  proxy in front) and a 303 to the same URL without the token; the link's use is recorded
  and a replay is refused (403). Every other request needs that cookie: none -> 401
  (with `[auth.oidc]`, a browser page load without a live cookie goes to sign-in instead,
  signin.py);
  invalid, expired, another workspace's, revoked or of an earlier workspace of that id
  -> 403. Checking it is an HMAC plus a comparison with the cached row's access_nonce,
  never a database query while the route is cached.
- `<root>_codehub/...` is the gateway's own (events, status); nothing under it reaches
  the workspace. Event streams are limited per workspace and per client address (the
  peer, or the X-Forwarded-For client when the peer is a trusted proxy): over a limit,
  429 (events.py).
- RUNNING and ready: proxied (HTTP or WebSocket), and the workspace is marked active.
- WARM, NEW, or RUNNING but not yet reachable: a browser GET for HTML sets desired RUNNING
  (if it was not), records the access at once, sends a hint, and gets the loading page
  (200, no-store); other requests get 503 + Retry-After; a WebSocket upgrade gets 503,
  which the IDE's reconnect logic retries, and wakes nothing (the retries of a tab nobody
  uses would keep its workspace up forever): with gateway.activity = "input" the tab's
  first key or click reports to `<root>/_codehub/activity`, which wakes it, and the tab
  reloads onto the loading page (presence.py).
- With gateway.activity = "input", the workbench document (`<root>/` loaded by a
  browser) gets the presence script, served at `<root>/_codehub/presence.js`.
- COLD (or being archived or restored): 502 and the archived page; ERROR: 502 with the
  recorded reason; being deleted: 502; unknown workspace: 404.
- A running workspace that refuses the connection: its row is read again; if it is no
  longer running the state answer above is given, else a 502 page.
- The database unavailable: a workspace with a known route keeps being proxied (see
  routes); anything that needs a read or write it cannot make (an unknown workspace, a
  wake-up, a link exchange) gets 503 + Retry-After within `database.statement_timeout`.
- A WebSocket upgrade over limits.websockets_per_workspace or limits.websockets_per_client
  gets 429 with Retry-After before anything is sent to the workspace (limits.py counts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import aiohttp
from aiohttp import web

from ..clock import Clock
from ..config import Config
from ..interfaces import HintBus, InstanceController
from ..metrics import STEPPED_DOWN_UNDER_OPEN_TAB
from ..model import DesiredState, Operation, Status
from ..origins import Origins, is_local
from ..signing import SigningKeys, Verdict
from ..store import Store, StoreUnavailable
from . import auth, events, limits, signin
from .access import Access
from .activity import Activity
from .auth import COOKIE_NAME, HOST_COOKIE_NAME
from .busypoll import BusyPoll
from .pages import Pages, plain, wants_html
from .peers import Peers
from .presence import ACTIVITY_PATH, SCRIPT_PATH, Presence
from .proxy import Forwarding, proxy_http
from .routes import Route, RouteTable
from .upstream import UpstreamError, UpstreamPool
from .watch import Watchers, healthy
from .websocket import UpstreamRefused, is_upgrade, relay

MAX_ID_LENGTH = 128
_WAKE_FROM = (Status.WARM, Status.RUNNING, Status.NEW)
# A wake never rides on an archive or a delete already under way: the archive would end
# COLD with RUNNING desired, i.e. an automatic restore, which only an admin may ask for.
_WAKE_DURING = tuple(o for o in Operation if o not in (Operation.ARCHIVING,
                                                       Operation.DELETING))
_COLD_OPERATIONS = (Operation.ARCHIVING, Operation.RESTORING)
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
_SAME_ORIGIN = frozenset({"same-origin", "none"})
_LINK_REFUSED = {
    Verdict.USED: "This access link was already used: a link opens a workspace once, in "
                  "one browser. Ask for a new one.",
    Verdict.REVOKED: "This access link is no longer valid: access to the workspace was "
                     "revoked, or the workspace was made anew. Ask for a new one.",
    Verdict.INVALID: "This access link has expired or is not valid. Ask for a new one.",
}


class Gateway:
    """The gateway's resources, shared by every request (created by gateway_ctx)."""

    def __init__(self, cfg: Config, store: Store, hints: HintBus,
                 instances: InstanceController, keys: SigningKeys, pages: Pages,
                 clock: Clock) -> None:
        g = cfg.gateway
        self.cfg = cfg
        self.store = store
        self.hints = hints
        self.keys = keys
        self.pages = pages
        self.clock = clock
        self.signin: signin.SignIn | None = None  # set by gateway_ctx with [auth.oidc]
        # Behind a TLS-terminating proxy the request itself is plain HTTP; the configured
        # public URL says what the browser sees (no forwarded header is trusted for this).
        self.public_https = cfg.server.public_url.lower().startswith("https://")
        self.origins = Origins(cfg.server.public_url, g.workspace_host)
        self.cookie_name = (HOST_COOKIE_NAME if self.origins.host_mode and self.public_https
                            else COOKIE_NAME)
        self.peers = Peers(g.trusted_proxies)
        self.retry_after = g.wake_retry_after
        self.health_path = cfg.docker.health_path
        self.events_poll_interval = g.events_poll_interval
        self.busy_poll = BusyPoll(g.busy_poll_us / 1e6)
        self.pool = UpstreamPool(connect_timeout=g.upstream_connect_timeout,
                                 idle_timeout=g.upstream_idle_timeout,
                                 max_idle=g.upstream_max_idle, kick=self.busy_poll.kick)
        # WebSockets and health checks. Its own connector without a limit: relayed sockets
        # hold their connection for hours and must never wait for (or starve) a slot.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=False, force_close=True),
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=g.upstream_connect_timeout),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        self.routes = RouteTable(store, instances, ttl=g.route_ttl,
                                 stale_max=g.stale_route_max)
        self.access = Access(keys, store, self.routes, cfg.auth.cookie_ttl)
        self.watchers = Watchers(self.routes, self.ready, poll_interval=g.events_poll_interval)
        self.stream_slots = limits.Slots(per_workspace=g.events_per_workspace,
                                               per_client=g.events_per_client)
        self.activity = Activity(store, interval=g.activity_flush_interval,
                                 keep_sockets_active=g.websocket_keeps_active,
                                 clock=clock.time, sort_sockets=g.activity == "input")
        self.presence = Presence(pages.directory, self.activity, enabled=g.activity == "input",
                                 default_warm_ttl=cfg.reconciler.default_warm_ttl)
        self._stepped_down: dict[str, int] = {}  # counted: workspace id -> its generation
        # Relayed WebSockets by workspace: the handler task and its cookie's nonce.
        self._sockets: dict[str, dict[asyncio.Task[Any], str]] = {}
        self._rechecks: set[asyncio.Task[None]] = set()
        self.ws_slots = limits.Slots(per_workspace=cfg.limits.websockets_per_workspace,
                                     per_client=cfg.limits.websockets_per_client)

    async def close(self) -> None:
        for task in list(self._rechecks):
            task.cancel()
        await asyncio.gather(*self._rechecks, return_exceptions=True)
        await self.watchers.close()
        await self.routes.close()
        await self.session.close()
        self.pool.close()

    def housekeeping(self) -> None:
        self.routes.prune()
        self.pool.prune()

    # --- answers that are not the IDE ---------------------------------------------------

    def refuse(self, request: web.Request, status: int, title: str, message: str,
               workspace_id: str, *, detail: str = "", retry_after: int | None = None,
               ) -> web.Response:
        if wants_html(request) and not is_upgrade(request):
            return self.pages.error(status, title, message, workspace_id=workspace_id,
                                    detail=detail, retry_after=retry_after)
        return plain(status, f"{title} {message}".strip(), retry_after=retry_after)

    def denied(self, request: web.Request, workspace_id: str, verdict: Verdict) -> web.Response:
        if verdict is Verdict.MISSING:
            return self.refuse(request, 401, "Sign-in needed.",
                               "Open this workspace through an access link from CodeHub.",
                               workspace_id)
        why = {Verdict.EXPIRED: "has expired",
               Verdict.REVOKED: "was revoked (or belongs to an earlier workspace of this id)",
               }.get(verdict, "is not valid for this workspace")
        return self.refuse(request, 403, "Access denied.",
                           f"Your access {why}. Ask for a new access link.", workspace_id)

    def db_unavailable(self, request: web.Request, workspace_id: str, exc: Exception,
                       ) -> web.Response:
        return self.refuse(request, 503, "CodeHub cannot reach its database.",
                           "Try again in a moment.", workspace_id, detail=str(exc),
                           retry_after=self.retry_after)

    async def wake(self, workspace_id: str) -> None:
        """Ask for RUNNING, record the access now (so the TTL sweep does not put the
        workspace straight back to sleep) and hint the reconciler."""
        row = await self.store.set_desired(workspace_id, DesiredState.RUNNING,
                                           expect_status=_WAKE_FROM,
                                           expect_operation=_WAKE_DURING)
        if row is None:
            return
        await self.store.flush_activity([workspace_id], [self.clock.now()])
        self.routes.invalidate(workspace_id)
        await self.hints.publish(workspace_id)

    async def state_answer(self, request: web.Request, workspace_id: str, route: Route,
                           ) -> web.Response:
        ws = route.workspace
        if ws is None:
            return self.refuse(request, 404, "No such workspace.",
                               "Check the link, or ask for a new one.", workspace_id)
        if (ws.desired_state is DesiredState.DELETED or ws.status is Status.DELETED
                or ws.operation is Operation.DELETING):
            return self.refuse(request, 502, "Workspace being deleted.",
                               "This workspace is being deleted.", workspace_id)
        if ws.status is Status.ERROR:
            return self.refuse(request, 502, "Workspace failed.",
                               "The workspace is in an error state and waits for an "
                               "administrator.", workspace_id,
                               detail=ws.error_message or "No reason was recorded.")
        if ws.status is Status.COLD or ws.operation in _COLD_OPERATIONS:
            if wants_html(request) and not is_upgrade(request):
                return self.pages.cold(workspace_id, ws)
            return plain(502, "The workspace is archived (COLD) and must be restored.")
        # Waking: WARM, NEW, or RUNNING without a reachable upstream yet.
        if is_upgrade(request) or not wants_html(request):
            return plain(503, "The workspace is starting." if ws.desired_state is
                         DesiredState.RUNNING else "The workspace is resting (stepped down); "
                         "a page load in a browser wakes it.", retry_after=self.retry_after)
        if request.method == "GET" and ws.desired_state is not DesiredState.RUNNING:
            try:
                await self.wake(workspace_id)
                route = await self.routes.get(workspace_id)
            except StoreUnavailable as exc:
                return self.db_unavailable(request, workspace_id, exc)
            ws = route.workspace or ws
        return self.pages.loading(workspace_id, ws, self.origins.prefix(workspace_id) + "/")

    async def exchange_link(self, request: web.Request, workspace_id: str,
                            cookies: list[str], now: float) -> web.StreamResponse | None:
        """Answer `?access=` on a GET; None when the request has no access token."""
        token = request.query.get("access")
        if token is None:
            return None
        cred = self.access.verify_link(workspace_id, token, now)
        clean = str(request.rel_url.without_query_params("access"))
        if not is_local(clean):  # "//evil/?access=" must not answer Location: //evil/
            clean = "/"
        if cred.verdict is Verdict.OK:
            try:
                cred = await self.access.redeem(workspace_id, cred)
            except StoreUnavailable as exc:
                return self.db_unavailable(request, workspace_id, exc)
        if cred.verdict is not Verdict.OK:
            # A browser that already holds a good cookie (a reload of the link's URL) is
            # sent on; the request after the redirect is checked in full.
            if self.access.check_cookie(workspace_id, cookies, now).verdict is Verdict.OK:
                return _see_other(clean)
            return self.refuse(request, 403, "Access link not valid.",
                               _LINK_REFUSED.get(cred.verdict, _LINK_REFUSED[Verdict.INVALID]),
                               workspace_id)
        resp = _see_other(clean)
        resp.set_cookie(self.cookie_name, self.access.cookie(workspace_id, cred.nonce, now),
                        path=self.origins.prefix(workspace_id) + "/",
                        max_age=self.access.cookie_ttl,
                        httponly=True, samesite="Lax",
                        secure=request.secure or self.public_https)
        return resp

    def ready(self, route: Route) -> Awaitable[bool]:
        """Does the workspace's health check answer 2xx through the gateway's own path?"""
        return healthy(self.session, route, self.health_path)

    async def own_endpoint(self, request: web.Request, workspace_id: str, target: str,
                           fwd: Forwarding, route: Route) -> web.StreamResponse:
        path = target.partition("?")[0]
        if self.presence.enabled:
            if path == ACTIVITY_PATH and request.method == "POST":
                return await self.presence.report(workspace_id, route, self.wake)
            if path == SCRIPT_PATH and request.method == "GET":
                return self.presence.script_response()
        if path == "/_codehub/events" and request.method == "GET":
            return await events.events(request, workspace_id, self.watchers,
                                       self.stream_slots, self.peers.client_address(fwd))
        if path == "/_codehub/status" and request.method == "GET":
            return await events.status(self.routes, self.ready, workspace_id)
        return plain(404, "Not found.")

    def cross_site(self, request: web.Request, workspace_id: str, fwd: Forwarding,
                   upgrade: bool) -> web.Response | None:
        """A refusal (403) for a WebSocket or a state-changing request that a browser sent
        from anywhere but the workspace's own origin; None for everything else. Safe
        requests (GET, HEAD, OPTIONS) pass: they are checked by the cookie alone, and the
        same-origin policy keeps their answers from other origins. Clients that are not
        browsers send neither Origin nor Sec-Fetch-Site and pass (they still need the
        cookie)."""
        if request.method in _SAFE and not upgrade:
            return None
        headers = request.headers
        site = headers.get("Sec-Fetch-Site")
        origin = headers.get("Origin")
        own = self.origins.own_origin(workspace_id, fwd.proto, fwd.host)
        if (site is None or site in _SAME_ORIGIN) and (origin is None or origin.lower() == own):
            return None
        what = "WebSocket" if upgrade else f"{request.method} request"
        return self.refuse(request, 403, "Refused.",
                           f"This {what} came from another site or origin "
                           f"({origin or 'Sec-Fetch-Site: ' + (site or '')}), not from "
                           f"{own}.", workspace_id)

    # --- the entry point --------------------------------------------------------------------

    async def handle(self, request: web.Request, workspace_id: str, target: str,
                     ) -> web.StreamResponse:
        """Serve `target` (the path and query below the workspace's root, as sent) of
        `workspace_id`. The caller has checked that both are well formed."""
        remote = request.remote or ""
        fwd = Forwarding(request, self.origins.prefix(workspace_id),
                         trusted=self.peers.trusted(remote), remote=remote)
        upgrade = is_upgrade(request)
        refused = self.cross_site(request, workspace_id, fwd, upgrade)
        if refused is not None:
            return refused
        now = self.clock.time()
        headers = request.headers
        cookies = headers.getall("Cookie", ())
        values, fwd.cookie = auth.split_cookie_header(
            cookies[0] if len(cookies) == 1 else ("; ".join(cookies) or None),
            self.cookie_name)
        if "access=" in target and request.method == "GET":
            answer = await self.exchange_link(request, workspace_id, values, now)
            if answer is not None:
                return answer
        cred = self.access.check_cookie(workspace_id, values, now)
        if cred.verdict is not Verdict.OK:
            return (self.signin is not None and signin.redirect(
                request, workspace_id, target, cred.verdict, self.origins.public_base,
            )) or self.denied(request, workspace_id, cred.verdict)
        route = self.routes.cached(workspace_id)
        if route is None:
            try:
                route = await self.routes.get(workspace_id)
            except StoreUnavailable as exc:
                return self.db_unavailable(request, workspace_id, exc)
        ws = route.workspace
        if ws is not None and ws.access_nonce != cred.nonce:
            return self.denied(request, workspace_id, Verdict.REVOKED)
        if target.startswith("/_codehub/"):
            return await self.own_endpoint(request, workspace_id, target, fwd, route)
        if not route.host:
            return await self.state_answer(request, workspace_id, route)
        self.activity.mark(workspace_id)
        if upgrade:
            return await self.websocket(request, workspace_id, route, target, fwd, cred.nonce)
        # The workbench document gets the presence script (presence.py), once per tab.
        proxy = self.presence.workbench if self.presence.wants(request, target) else proxy_http
        try:
            return await proxy(self.pool, request, route.host, route.port, target, fwd)
        except UpstreamError as exc:
            return await self.unreachable(request, workspace_id, str(exc))

    async def websocket(self, request: web.Request, workspace_id: str, route: Route,
                        target: str, fwd: Forwarding, nonce: str) -> web.StreamResponse:
        url = f"ws://{route.host}:{route.port}{target}"
        client = self.peers.client_address(fwd)
        refused = self.ws_slots.take(workspace_id, client)
        if refused is not None:
            return limits.too_many_websockets(refused, self.ws_slots)
        try:
            return await self._relay(request, workspace_id, url, fwd, nonce)
        finally:
            self.ws_slots.give(workspace_id, client)

    async def _relay(self, request: web.Request, workspace_id: str, url: str,
                     fwd: Forwarding, nonce: str) -> web.StreamResponse:
        task = asyncio.current_task()
        sockets = self._sockets.setdefault(workspace_id, {})
        if task is not None:
            sockets[task] = nonce
        try:
            return await relay(self.session, request, url, fwd, workspace_id, self.activity,
                               self.busy_poll.kick)
        except UpstreamRefused as exc:
            if exc.status == 502:
                return await self.unreachable(request, workspace_id, str(exc))
            return plain(exc.status if exc.status >= 400 else 502, str(exc))
        finally:
            if task is not None:
                sockets.pop(task, None)
            if not sockets and self._sockets.get(workspace_id) is sockets:
                del self._sockets[workspace_id]
                self._stepped_down.pop(workspace_id, None)

    def recheck_sockets(self, workspace_id: str | None) -> None:
        """After a hint: relayed WebSockets whose cookie's nonce is no longer the row's
        (access revoked, workspace deleted) are closed. Called by the hint consumer."""
        ids = list(self._sockets) if workspace_id is None else (
            [workspace_id] if workspace_id in self._sockets else [])
        for wid in ids:
            task = asyncio.ensure_future(self._close_revoked(wid))
            self._rechecks.add(task)
            task.add_done_callback(self._rechecks.discard)

    async def _close_revoked(self, workspace_id: str) -> None:
        try:
            ws = (await self.routes.get(workspace_id)).workspace
        except StoreUnavailable:
            return  # nothing is known to have changed; the next hint or resync tells
        current = ws.access_nonce if ws is not None else None
        if (ws is not None and ws.status is Status.RUNNING and workspace_id in self._sockets
                and ws.desired_state in (DesiredState.WARM, DesiredState.COLD)
                and self._stepped_down.get(workspace_id) != ws.generation):
            self._stepped_down[workspace_id] = ws.generation  # once per step-down
            STEPPED_DOWN_UNDER_OPEN_TAB.inc()
        for task, nonce in list(self._sockets.get(workspace_id, {}).items()):
            if nonce != current:
                task.cancel()  # the relay's own cleanup closes both sides

    async def unreachable(self, request: web.Request, workspace_id: str, detail: str,
                          ) -> web.Response:
        try:
            route = await self.routes.fresh(workspace_id)
        except StoreUnavailable:
            route = None
        if route is not None and not route.host:
            return await self.state_answer(request, workspace_id, route)
        return self.refuse(request, 502, "The workspace is not answering.",
                           "Its IDE did not accept the connection. Try again in a moment.",
                           workspace_id, detail=detail, retry_after=self.retry_after)


def _see_other(location: str) -> web.Response:
    # no-store and no-referrer: the URL that carried the token is never cached nor leaked.
    return web.Response(status=303, headers={
        "Location": location, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
