"""The self-service page and its JSON calls (only with `[auth.oidc]`).

Guarantees:
- `GET /` sends a browser (303) to the page, `<main>/_codehub/auth/home`: it lives under
  the session cookie's scope (sessions.Scope), so the page and its calls get the session
  and no workspace ever does. Without a valid session the page starts sign-in and the
  person comes back to it.
- The calls live under `/_codehub/auth/self/`; they answer JSON, every refusal as
  `{"error": {"code", "message"}}`; no (valid) session is 401 `signed_out`.
- A POST is refused 403 `cross_site` before its body is read unless its Content-Type is
  application/json (a cross-site form cannot send one; a cross-site fetch needs a CORS
  preflight, which is never answered), its Origin is the gateway's public origin
  (server.public_url) and Sec-Fetch-Site, when sent, is same-origin.
- A person lists and acts on the workspaces they own; an admin may list all (`?all=1`)
  and act on any; anyone else's workspace is 403 `not_yours` and an unknown one 404,
  before anything is written.
- open (wakes a WARM one), stop (WARM), archive (COLD) and restore (WARM, or RUNNING with
  `{"start": true}`) are checked by model.py's rules and written by desire.py, exactly as
  the admin API writes them, hint included. create and delete are open to people only
  when auth.oidc.self_service_create / self_service_delete say so (else 403
  `not_allowed`; admins always may);
  create keeps a person within auth.oidc.max_workspaces_per_owner (409 `owner_limit`,
  Store.create_within); admins are not limited and may name another owner.
- Every POST of a signed-in person, refused or not, is one audit_log row once answered:
  actor `person:<name>`, action `self.<verb>`, the workspace, the status answered, the
  request id (X-Request-Id, answered back) and detail {admin, the body}; a body holds only
  the fields its verb takes (create: owner; restore: start), anything else is 400.
- `GET .../workspaces/{id}/events` is the loading page's own event stream (events.py:
  the same watchers, the same limits) for a workspace the person may see.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from yarl import URL

from .. import audit, desire
from ..config import Config
from ..interfaces import HintBus
from ..logs import PERSON, REQUEST_ID, WORKSPACE_ID_VAR, request_id_of
from ..model import WORKSPACE_ID, DesiredState, Refusal, Workspace, desire_refusal
from ..model import restore_refusal as restore_rule
from ..store import AlreadyExists, OwnerLimit, Store, StoreUnavailable
from ..view import workspace_json
from . import events, signin
from .limits import Slots
from .peers import Peers
from .proxy import Forwarding
from .sessions import Session
from .signin import SignIn
from .watch import Watchers

log = logging.getLogger(__name__)
HOME = signin.PREFIX + "/home"
SELF = signin.PREFIX + "/self"
_MAX_BODY = 4096


class Refuse(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _reply(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status,
                        content_type="application/json", headers={"Cache-Control": "no-store"})


def _error(status: int, code: str, message: str) -> web.Response:
    return _reply({"error": {"code": code, "message": message}}, status)


@dataclass(frozen=True, slots=True)
class SelfService:
    """The page's state, made by the gateway's wiring (under SELF_SERVICE): the sign-in
    state, and the gateway's config, hint bus, watchers, stream limits and peers."""

    signin: SignIn
    cfg: Config
    hints: HintBus
    watchers: Watchers
    stream_slots: Slots
    peers: Peers

    @property
    def store(self) -> Store:
        return self.signin.store


SELF_SERVICE = web.AppKey("self_service", SelfService)


def _state(request: web.Request) -> SelfService:
    return request.config_dict[SELF_SERVICE]  # the routes exist only when it does


def _session(request: web.Request) -> Session:
    si = _state(request).signin
    session = si.signer.check_session(request.cookies.get(si.scope.session))
    if session is None:
        raise Refuse(401, "signed_out", "You are not signed in (or your session ended); "
                     "reload the page to sign in.")
    PERSON.set(session.person)
    return session


def _same_origin(request: web.Request) -> None:
    """The CSRF defence of every POST (see Guarantees)."""
    public = str(URL(_state(request).signin.origins.public_base).origin())
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    site = request.headers.get("Sec-Fetch-Site", "same-origin")
    if ctype != "application/json" or request.headers.get("Origin") != public or (
            site != "same-origin"):
        raise Refuse(403, "cross_site", "Only CodeHub's own page may do this (a JSON "
                     "request from " + public + ").")


# What each POST's body may hold (anything else is 400; what is left is audited as is).
_FIELDS = {"create": frozenset({"owner"}), "restore": frozenset({"start"})}


async def _body(request: web.Request, verb: str) -> dict[str, Any]:
    raw = await request.content.read(_MAX_BODY + 1)
    if len(raw) > _MAX_BODY:
        raise Refuse(413, "body_too_large", f"at most {_MAX_BODY} bytes")
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise Refuse(400, "invalid_json", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise Refuse(400, "invalid_request", "the body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS.get(verb, frozenset()))
    if unknown:
        raise Refuse(400, "invalid_request", f"{verb} takes no {', '.join(unknown)[:100]}")
    return body


def _shown(ws: Workspace, cfg: Config) -> dict[str, Any]:
    data = workspace_json(ws, cfg)
    if data["archive"] is not None:  # where the archive is stored is the operator's matter
        data["archive"] = {k: data["archive"][k] for k in ("size", "created_at")}
    del data["image"]
    return data


@dataclass(slots=True)
class Act:
    """One POST as it goes: who, what, on which workspace, with what body."""

    request: web.Request
    session: Session
    verb: str
    workspace_id: str | None
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> SelfService:
        return _state(self.request)

    async def mine(self) -> Workspace:
        """The workspace acted on, when the person may act on it."""
        assert self.workspace_id is not None
        ws = await self.state.store.get(self.workspace_id)
        if ws is None or ws.desired_state is DesiredState.DELETED:
            raise Refuse(404, "not_found", f"no workspace {self.workspace_id}")
        if ws.owner != self.session.person and not self.session.admin:
            raise Refuse(403, "not_yours", f"workspace {ws.id} belongs to someone else; "
                         f"you are signed in as {self.session.person}")
        return ws

    async def want(self, rule: Callable[[Workspace], Refusal | None],
                   desired: DesiredState) -> Workspace:
        await self.mine()
        assert self.workspace_id is not None
        try:
            _, after = await desire.change(self.state.store, self.state.hints,
                                           self.workspace_id, rule, desired)
        except desire.Refused as exc:
            raise Refuse(409, exc.refusal.code, exc.refusal.message) from None
        except desire.NotFound:
            raise Refuse(404, "not_found", f"no workspace {self.workspace_id}") from None
        except desire.KeptChanging:
            raise Refuse(409, "conflict", "the workspace kept changing; try again") from None
        log.info("self-service: %s asked %s of workspace %s", self.session.person,
                 self.verb, after.id)
        return after


async def _open(act: Act) -> web.Response:
    ws = await act.want(lambda w: desire_refusal(w, DesiredState.RUNNING), DesiredState.RUNNING)
    return _reply({"workspace": _shown(ws, act.state.cfg),
                   "url": signin.access_url(act.state.signin, ws)})


async def _stop(act: Act) -> web.Response:
    ws = await act.want(lambda w: desire_refusal(w, DesiredState.WARM), DesiredState.WARM)
    return _reply({"workspace": _shown(ws, act.state.cfg)}, 202)


async def _archive(act: Act) -> web.Response:
    ws = await act.want(lambda w: desire_refusal(w, DesiredState.COLD), DesiredState.COLD)
    return _reply({"workspace": _shown(ws, act.state.cfg)}, 202)


async def _restore(act: Act) -> web.Response:
    start = act.body.get("start", False)
    if not isinstance(start, bool):
        raise Refuse(400, "invalid_request", "start: must be true or false")
    ws = await act.want(restore_rule, DesiredState.RUNNING if start else DesiredState.WARM)
    return _reply({"workspace": _shown(ws, act.state.cfg)}, 202)


async def _delete(act: Act) -> web.Response:
    ws = await act.mine()
    if not act.state.cfg.auth.oidc.self_service_delete and not act.session.admin:
        raise Refuse(403, "not_allowed", "Deleting workspaces here is turned off; ask an "
                     "administrator.")
    ws = await desire.delete(act.state.store, act.state.hints, ws.id)
    log.info("self-service: %s asked to delete workspace %s", act.session.person, ws.id)
    return _reply({"workspace": _shown(ws, act.state.cfg)}, 202)


def _new_owner(act: Act) -> str:
    owner = act.body.get("owner", act.session.person)
    if not isinstance(owner, str) or not 0 < len(owner) <= 320:
        raise Refuse(400, "invalid_request", "owner: a person's name")
    if owner != act.session.person and not act.session.admin:
        raise Refuse(403, "not_yours", "only an administrator creates workspaces for others")
    return owner


async def _create(act: Act) -> web.Response:
    oidc = act.state.cfg.auth.oidc
    if not oidc.self_service_create and not act.session.admin:
        raise Refuse(403, "not_allowed", "Creating workspaces here is turned off; ask an "
                     "administrator.")
    owner = _new_owner(act)
    limit = 1 << 30 if act.session.admin else oidc.max_workspaces_per_owner
    for _ in range(3):
        try:
            ws = await act.state.store.create_within(
                limit, id="ws-" + secrets.token_hex(5), owner=owner,
                image_ref=act.state.cfg.docker.workspace_image, desired_state=DesiredState.RUNNING)
            break
        except AlreadyExists:
            continue
        except OwnerLimit as exc:
            raise Refuse(409, "owner_limit", f"{owner} already has {exc.limit} workspace(s), "
                         "the most allowed; delete one first") from None
    else:
        raise Refuse(409, "conflict", "no free generated id; try again")
    act.workspace_id = ws.id
    await act.state.hints.publish(ws.id)
    log.info("self-service: %s created workspace %s for %s", act.session.person, ws.id, owner)
    return _reply({"workspace": _shown(ws, act.state.cfg)}, 201)


VERBS: dict[str, Callable[[Act], Awaitable[web.Response]]] = {
    "open": _open, "stop": _stop, "archive": _archive, "restore": _restore,
    "delete": _delete}


async def _act(request: web.Request, verb: str, workspace_id: str | None,
               handler: Callable[[Act], Awaitable[web.Response]]) -> web.Response:
    rid = request_id_of(request.headers.get("X-Request-Id"))
    REQUEST_ID.set(rid)
    WORKSPACE_ID_VAR.set(workspace_id)
    act: Act | None = None
    try:
        act = Act(request, _session(request), verb, workspace_id)
        _same_origin(request)
        act.body = await _body(request, verb)
        if workspace_id is not None and not WORKSPACE_ID.fullmatch(workspace_id):
            raise Refuse(404, "not_found", "no such workspace")
        resp = await handler(act)
    except Refuse as exc:
        resp = _error(exc.status, exc.code, exc.message)
    except StoreUnavailable:
        resp = _error(503, "unavailable", "CodeHub cannot reach its database; try again")
        resp.headers["Retry-After"] = "2"
    resp.headers["X-Request-Id"] = rid
    if act is not None:
        await audit.AuditLog(act.state.store).record(audit.Entry(
            "person:" + act.session.person, "self." + verb, act.workspace_id, resp.status,
            rid, {"admin": act.session.admin, **act.body}))
    return resp


async def act_on(request: web.Request) -> web.Response:
    verb = request.match_info["verb"]
    if verb not in VERBS:
        return _error(404, "not_found", f"no action {verb[:40]}")
    return await _act(request, verb, request.match_info["wid"], VERBS[verb])


async def create(request: web.Request) -> web.Response:
    return await _act(request, "create", None, _create)


async def listing(request: web.Request) -> web.Response:
    state = _state(request)
    try:
        session = _session(request)
        every = request.query.get("all") == "1" and session.admin
        rows = await state.store.list_page(owner=None if every else session.person, limit=500)
    except Refuse as exc:
        return _error(exc.status, exc.code, exc.message)
    except StoreUnavailable:
        return _error(503, "unavailable", "CodeHub cannot reach its database; try again")
    oidc = state.cfg.auth.oidc
    return _reply({
        "person": session.person, "admin": session.admin, "all": every,
        "can_create": oidc.self_service_create or session.admin,
        "can_delete": oidc.self_service_delete or session.admin,
        "max_workspaces": None if session.admin else oidc.max_workspaces_per_owner,
        "items": [_shown(ws, state.cfg) for ws in rows
                  if ws.desired_state is not DesiredState.DELETED]})


async def stream(request: web.Request) -> web.StreamResponse:
    """The loading page's event stream, for a workspace this person may see."""
    state = _state(request)
    try:
        act = Act(request, _session(request), "events", request.match_info["wid"])
        if not WORKSPACE_ID.fullmatch(act.workspace_id or ""):
            raise Refuse(404, "not_found", "no such workspace")
        await act.mine()
    except Refuse as exc:
        return _error(exc.status, exc.code, exc.message)
    except StoreUnavailable:
        return _error(503, "unavailable", "CodeHub cannot reach its database; try again")
    remote = request.remote or ""
    peers = state.peers
    client = peers.client_address(Forwarding(request, "", trusted=peers.trusted(remote),
                                             remote=remote))
    return await events.events(request, request.match_info["wid"], state.watchers,
                               state.stream_slots, client)


async def home(request: web.Request) -> web.StreamResponse:
    si = _state(request).signin
    if si.signer.check_session(request.cookies.get(si.scope.session)) is None:
        return await signin.start(request, HOME)
    return si.pages.portal()


async def root(request: web.Request) -> web.Response:
    home = _state(request).signin.origins.public_base + HOME
    return web.Response(status=303, headers={"Location": home, "Cache-Control": "no-store"})


def setup(app: web.Application) -> None:
    app.router.add_get("/", root)
    app.router.add_get(HOME, home)
    app.router.add_get(SELF + "/workspaces", listing)
    app.router.add_post(SELF + "/workspaces", create)
    app.router.add_post(SELF + "/workspaces/{wid}/{verb}", act_on)
    app.router.add_get(SELF + "/workspaces/{wid}/events", stream)
