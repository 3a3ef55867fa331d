"""Signing in at the gateway: the routes between a browser, the identity provider and a
workspace (only when `auth.oidc.issuer` is set).

The session lives on CodeHub's main origin; the workspace credential is the workspace's
own cookie (codehub/signing.py), on the workspace's origin in host mode. The one thing that crosses
from one to the other is an access link, so a signed-in person gets exactly what an
access link gives, in path mode and in host mode alike:

  browser, no workspace cookie -> <main>/_codehub/auth/open/{id}?path=<where it was>
  open, no session             -> the provider's login (flow cookie set) -> callback
  callback                     -> session cookie set -> open again
  open, session, owner/admin   -> a fresh single-use access link -> the workspace

Guarantees:
- A browser GET for HTML of a workspace without a workspace cookie (or with an expired
  one) is redirected (303) to `open` on the main origin, the path it asked for kept;
  everything else still gets the 401/403 of handler.py. Without `[auth.oidc]` none of
  these routes exist and nothing changes.
- `open` with a valid session: the workspace's row is read; its owner (or an admin) gets a
  303 to a new access link (60 s, single use) for the path asked for; another person gets
  403 with a page that says whose it is not; an unknown workspace 404.
- `callback` accepts a code only with the flow cookie of the same browser, a `state` equal
  to the flow's (compared in constant time) and never used before (recorded through
  Store.use_link, so a replay to any replica is refused), and an `iss` parameter, when
  the provider sends one (RFC 9207), equal to the issuer; the ID token must pass
  oidc.OidcClient.verify and identity. Every refusal is a page (400, 403 or 502) saying
  why; nothing is created: no session cookie is set and the flow cookie is removed.
- `logout` (GET or same-origin POST) removes the session cookie and sends the browser to
  the provider's end_session_endpoint (client_id, post_logout_redirect_uri) where it
  advertises one, else to `signed-out`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlencode

from aiohttp import web

from .. import revocations, signing
from ..model import WORKSPACE_ID, DesiredState, Workspace
from ..origins import Origins, is_local
from ..signing import SigningKeys, Verdict
from ..store import Store, StoreUnavailable
from .oidc import Flow, OidcClient, OidcError
from .pages import Pages
from .sessions import FLOW_TTL, PendingFlow, Scope, Signer

log = logging.getLogger(__name__)
PREFIX = "/_codehub/auth"
LINK_TTL = 60
_MAX_PATH = 2048
_PROVIDER_DOWN = frozenset({"provider_unreachable", "provider_error", "bad_discovery"})


def safe_path(path: str) -> bool:
    """A path of this site: one leading slash as a browser resolves it (origins.is_local:
    dot segments, `%2e`), no scheme or host, no backslash or control character (an open
    redirect needs one of those)."""
    return 0 < len(path) <= _MAX_PATH and "\\" not in path and is_local(path)


def open_url(base: str, workspace_id: str, target: str) -> str:
    """Where a browser without a workspace credential is sent (`base`: the main origin)."""
    path = target if safe_path(target) else "/"
    return f"{base}{PREFIX}/open/{workspace_id}?{urlencode({'path': path})}"


def redirect(request: web.Request, workspace_id: str, target: str, verdict: Verdict,
             public_base: str) -> web.Response | None:
    """The 303 to `open` for a browser page load without a (live) workspace cookie; None
    for every other request, which keeps handler.py's 401/403."""
    if (verdict not in (Verdict.MISSING, Verdict.EXPIRED) or request.method != "GET"
            or "text/html" not in request.headers.get("Accept", "")
            or "Upgrade" in request.headers):
        return None
    return _see_other(open_url(public_base, workspace_id, target))


@dataclass(slots=True)
class SignIn:
    """The sign-in routes' state, made by the gateway's wiring (under SIGNIN): the relying
    party, the cookie signer, and what they share with the gateway (the store, the link
    keys, the origins, the pages, its 503 answer, its clock's Unix seconds)."""

    client: OidcClient
    signer: Signer
    scope: Scope
    store: Store
    keys: SigningKeys
    origins: Origins
    public_https: bool
    pages: Pages
    db_unavailable: Callable[[web.Request, str, Exception], web.Response]
    now: Callable[[], float]

    @property
    def session_ttl(self) -> int:
        return self.client.cfg.session_ttl


SIGNIN = web.AppKey("signin", SignIn)


def _sign_in(request: web.Request) -> SignIn:
    return request.config_dict[SIGNIN]  # the routes exist only when it does


def _base(request: web.Request) -> str:
    """The main origin as the browser sees it: server.public_url (required with
    [auth.oidc]: the redirect URL registered at the provider is built from it), with its
    path if CodeHub is served below one."""
    return _sign_in(request).origins.public_base


def _secure(request: web.Request) -> bool:
    return bool(request.secure or _sign_in(request).public_https)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={
        "Location": location, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


def _page(request: web.Request, status: int, title: str, message: str, *,
          workspace_id: str = "", detail: str = "") -> web.Response:
    return _sign_in(request).pages.error(status, title, message, workspace_id=workspace_id,
                                         detail=detail)


async def start(request: web.Request, next_path: str) -> web.Response:
    """Send the browser to the provider's login, the flow's secrets in its cookie."""
    si = _sign_in(request)
    try:
        meta = await si.client.metadata()
    except OidcError as exc:
        return _page(request, 502, "Sign-in is unavailable.", str(exc))
    flow = Flow.new()
    resp = _see_other(si.client.authorization_url(meta, _base(request) + PREFIX + "/callback",
                                                  flow))
    resp.set_cookie(si.scope.flow, si.signer.flow(flow, next_path), path=si.scope.path,
                    max_age=FLOW_TTL, httponly=True, samesite="Lax", secure=_secure(request))
    return resp


async def open_workspace(request: web.Request) -> web.StreamResponse:
    si = _sign_in(request)
    workspace_id = request.match_info["wid"]
    path = request.query.get("path", "/")
    if not WORKSPACE_ID.fullmatch(workspace_id) or not safe_path(path):
        return _page(request, 404, "No such workspace.", "Check the link.")
    session = si.signer.check_session(request.cookies.get(si.scope.session))
    if session is None:
        return await start(request, request.rel_url.path_qs)
    try:
        ws = await si.store.get(workspace_id)
    except StoreUnavailable as exc:
        return si.db_unavailable(request, workspace_id, exc)
    if ws is None or ws.desired_state is DesiredState.DELETED:
        return _page(request, 404, "No such workspace.", "Check the link, or ask the "
                     "workspace's owner.", workspace_id=workspace_id)
    if ws.owner != session.person and not session.admin:
        return _page(request, 403, "Not your workspace.",
                     f"You are signed in as {session.person}, and this workspace belongs "
                     "to someone else. Ask its owner or an administrator.",
                     workspace_id=workspace_id)
    return _see_other(access_url(si, ws, path))


def access_url(si: SignIn, ws: Workspace, path: str = "/") -> str:
    """A fresh single-use access link (LINK_TTL) to `path` of the workspace."""
    token = signing.mint_access_link(si.keys, ws.id, ws.access_nonce, LINK_TTL, si.now())
    return si.origins.access_url(ws.id, token, path=path)


def _refused(request: web.Request, status: int, title: str, message: str,
             detail: str = "") -> web.Response:
    resp = _page(request, status, title, message, detail=detail)
    scope = _sign_in(request).scope
    resp.del_cookie(scope.flow, path=scope.path)
    return resp


async def callback(request: web.Request) -> web.StreamResponse:
    si = _sign_in(request)
    pending = si.signer.check_flow(request.cookies.get(si.scope.flow))
    q = request.query
    if pending is None:
        return _refused(request, 400, "Sign-in could not be completed.",
                        "This sign-in expired, was already completed, or began in another "
                        "browser. Open the workspace again to sign in anew.")
    state = q.get("state", "")
    if not hmac.compare_digest(state.encode(), pending.flow.state.encode()):
        return _refused(request, 400, "Sign-in could not be completed.",
                        "The answer from the identity provider does not belong to this "
                        "sign-in (state mismatch). Open the workspace again.")
    try:
        first = await si.store.use_link(
            "signin:" + state, "", datetime.fromtimestamp(pending.expires_at, UTC))
    except StoreUnavailable as exc:
        return _refused(request, 503, "CodeHub cannot reach its database.",
                        "Try again in a moment.", detail=str(exc))
    if not first:
        return _refused(request, 400, "Sign-in could not be completed.",
                        "This sign-in answer was already used (a replayed state). Open the "
                        "workspace again to sign in anew.")
    if "error" in q or not q.get("code"):
        return _refused(request, 403, "Sign-in refused.",
                        "The identity provider did not sign you in.",
                        detail=q.get("error", "no code")[:80])
    if "iss" in q and q["iss"] != si.client.cfg.issuer:  # RFC 9207: a mix-up of providers
        return _refused(request, 403, "Sign-in refused.",
                        "The answer names another identity provider than CodeHub's.",
                        detail="wrong_issuer")
    return await _finish(request, si, q["code"], pending)


async def _finish(request: web.Request, si: SignIn, code: str, pending: PendingFlow,
                  ) -> web.StreamResponse:
    """Redeem the code, check the ID token and the person, start the session."""
    try:
        meta = await si.client.metadata()
        id_token = await si.client.exchange(meta, code, _base(request) + PREFIX + "/callback",
                                            pending.flow)
        claims = await si.client.verify(meta, id_token, pending.flow.nonce)
        identity = si.client.identity(claims)
    except OidcError as exc:
        status = 502 if exc.reason in _PROVIDER_DOWN else 403
        log.warning("sign-in refused: %s", exc.reason)
        return _refused(request, status, "Sign-in refused.", str(exc), detail=exc.reason)
    log.info("signed in: %s%s", identity.person, " (admin)" if identity.admin else "")
    value, _ = si.signer.session(identity, si.session_ttl)
    resp = _see_other(_base(request) + pending.next_path)
    resp.set_cookie(si.scope.session, value, path=si.scope.path, max_age=si.session_ttl,
                    httponly=True, samesite="Lax", secure=_secure(request))
    resp.del_cookie(si.scope.flow, path=si.scope.path)
    return resp


def _cross_site(request: web.Request) -> bool:
    """Sent by another site's page (a navigation or a form): Sec-Fetch-Site says so, or,
    from a browser without fetch metadata, a POST's Origin other than CodeHub's own."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:  # a browser with fetch metadata says it (our pages send Origin:
        return site not in ("same-origin", "none")  # null: they are no-referrer)
    origin = request.headers.get("Origin")
    return request.method == "POST" and origin is not None and origin != _base(request)


async def logout(request: web.Request) -> web.StreamResponse:
    """Another site cannot sign a person out (GET or POST); a sign-out ends the session for
    good (sessions.py: its id is recorded), then the provider's."""
    si = _sign_in(request)
    if _cross_site(request):
        return _page(request, 403, "Refused.", "A sign-out must come from CodeHub's own pages.")
    session = si.signer.check_session(request.cookies.get(si.scope.session))
    if session is not None:
        si.signer.ended.end(session.sid, session.expires_at)
        try:
            await revocations.end_session(si.store, session.sid,
                                          datetime.fromtimestamp(session.expires_at, UTC))
        except StoreUnavailable as exc:  # this gateway refuses it; the others until expiry
            log.warning("sign-out of %s not recorded for the other replicas: %s",
                        session.person, exc or type(exc).__name__)
    target = _base(request) + PREFIX + "/signed-out"
    try:
        end = (await si.client.metadata()).end_session_endpoint
    except OidcError:
        end = ""
    if end:
        sep = "&" if "?" in end else "?"
        target = end + sep + urlencode({"client_id": si.client.cfg.client_id,
                                        "post_logout_redirect_uri": target})
    resp = _see_other(target)
    resp.del_cookie(si.scope.session, path=si.scope.path)
    return resp


async def signed_out(request: web.Request) -> web.StreamResponse:
    return _page(request, 200, "Signed out.", "You are signed out of CodeHub.")


def setup(app: web.Application) -> None:
    app.router.add_get(PREFIX + "/open/{wid}", open_workspace)
    app.router.add_get(PREFIX + "/callback", callback)
    app.router.add_route("GET", PREFIX + "/logout", logout)
    app.router.add_route("POST", PREFIX + "/logout", logout)
    app.router.add_get(PREFIX + "/signed-out", signed_out)
