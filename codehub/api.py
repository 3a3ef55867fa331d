"""The admin API under /api/v1 (README "Admin API"), and its OpenAPI document.

Guarantees:
- Declarative: a handler validates, writes desired_state and/or TTLs, publishes a hint and
  returns at once (202 where work follows). It never calls Docker or object storage.
- Every state change is a compare-and-set against the exact row (desired_state, status,
  operation) its checks were made on; `generation` is bumped by the store. A row that moved
  in between is re-read and re-checked, so a check never passes on stale data.
- `ROUTES` is the only declaration of paths, parameters and bodies: the same `Field`s
  validate requests and produce `GET /api/v1/openapi.json` (see `openapi.py`).
- Every error is `{"error": {"code", "message"}}`. Bad input of any kind is a 4xx, never a
  5xx; unknown paths and methods under /api/v1 get the same JSON error shape (404/405).
- Authentication: `Authorization: Bearer <token>`; the token's SHA-256 is compared with
  `hmac.compare_digest` against the digest of EVERY configured token, with no early exit,
  so the time taken depends neither on which token matched nor on how much of one did.
- No token configured: `setup()` refuses (ConfigError) unless `server.host` is a loopback
  address; on loopback the API then answers only direct loopback clients (no
  Forwarded/X-Forwarded-For header, so a local reverse proxy does not open it to the
  world) and refuses everyone else with 403. The start-up log says which mode is in force.
- No token configured, also: loopback alone does not stop a web page in the user's own
  browser (CSRF: a cross-site "simple" POST needs no preflight; DNS rebinding: a hostile
  name re-pointed at 127.0.0.1 lets the page read the answers). So every authenticated
  route, whatever the method, refuses
  - 403 `forbidden_host` a `Host` that is not a loopback name or address: `localhost`,
    127.0.0.0/8 or `[::1]`, with or without a port (exactly one Host header). Not
    `*.localhost`: browsers resolve those to loopback too, but workspace origins live
    there (`{id}.ws.localhost`), and a workspace's page must not reach this API;
  - 403 `cross_site` a request a web page sent: any `Origin`, or a `Sec-Fetch-Site`
    other than `none` (an address typed by the user). Not even the API's own origin is
    let in: in path mode it also serves every workspace's pages. Also for GET: a
    cross-site page could not read the answer anyway, but one rule for every method is
    simpler to trust;
  - 415 `unsupported_media_type` a `Content-Type` other than `application/json`
    (parameters such as charset allowed), and a body sent without a Content-Type. A
    request with neither (the CLI's bodyless POSTs) is accepted.
  Non-browser clients (the CLI, curl, scripts) send no Origin/Sec-Fetch-* and a loopback
  Host, so they pass. With a token configured none of this applies: the bearer token is
  the only rule (a browser never attaches it on its own).
- Listing pages by id with an opaque keyset cursor (base64url of the last id): rows created
  or deleted while a client pages never make it see a row twice or miss one that existed
  throughout.

Workspace ids match `ID_PATTERN`: 1-63 characters, lower-case letters, digits and inner
hyphens (a DNS label). They become parts of Docker container, volume and object-storage
names, so nothing else (no dots, slashes, NUL, upper case or unicode) is accepted.

Retrying a workspace in ERROR: `POST /api/v1/workspaces/{id}/retry` returns it to the
status it failed from (`error_from_status`), clears its error and failure count, and lets
the reconciler resume the operation that failed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from aiohttp import typedefs as web_types
from aiohttp import web

from . import audit, keys
from .config import Config, ConfigError
from .gateway import auth as gateway_auth
from .gateway.origins import Origins
from .logs import REQUEST_ID, WORKSPACE_ID_VAR, request_id_of
from .metrics import API_REQUESTS
from .model import WORKSPACE_ID, DesiredState, Operation, Status, Workspace
from .openapi import (
    ApiError,
    Args,
    Body,
    Field,
    Reply,
    Route,
    document,
    invalid,
    read_body,
    validate_body,
    validate_path,
    validate_query,
)
from .store import SETTINGS, AlreadyExists, Store

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
VERSION = "1"

ID_PATTERN = "^" + WORKSPACE_ID.pattern + "$"
OWNER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$"
# A Docker image reference: [registry/]path[:tag][@sha256:digest]. As in Docker, the first
# component is a registry only when it has a dot or a port or is localhost; path
# components are lower case.
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_REGISTRY = rf"(?:{_LABEL}(?:\.{_LABEL})+(?::[0-9]{{1,5}})?|{_LABEL}:[0-9]{{1,5}}|localhost)"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN = (rf"^(?:{_REGISTRY}/)?{_COMPONENT}(?:/{_COMPONENT})*"
                 r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$")
HOME_MIN_MIB = 16  # the smallest home file system (codehub.storage.disks)
TTL_MIN = 30  # seconds; well above the gateway's activity flush interval
TTL_MAX = 10 * 365 * 86400
LINK_TTL_MIN = 10
LINK_TTL_MAX = 30 * 86400
PAGE_DEFAULT = 100
PAGE_MAX = 500
_CAS_TRIES = 5

# --- schemas -----------------------------------------------------------------------------

_ID = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": ID_PATTERN}
_TTL = {"type": ["integer", "null"], "minimum": TTL_MIN, "maximum": TTL_MAX}
_TIME = {"type": "string", "format": "date-time"}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}


def _object(props: dict[str, Any], *, nullable: bool = False) -> dict[str, Any]:
    return {"type": ["object", "null"] if nullable else "object", "properties": props,
            "required": list(props), "additionalProperties": False}


SCHEMAS: dict[str, Any] = {
    "Workspace": _object({
        "id": {"type": "string", "pattern": ID_PATTERN},
        "owner": {"type": "string"},
        "image": {"type": "string"},
        "desired_state": {"type": "string", "enum": [d.value for d in DesiredState]},
        "status": {"type": "string", "enum": [s.value for s in Status]},
        "operation": {"type": "string", "enum": [o.value for o in Operation]},
        "last_access_at": _TIME,
        "warm_ttl_seconds": {"type": "integer", "minimum": 1,
                             "description": "Effective idle seconds before RUNNING -> WARM."},
        "cold_ttl_seconds": {"type": "integer", "minimum": 1,
                             "description": "Effective idle seconds before WARM -> COLD."},
        "home_size_limit_mib": {"type": "integer", "minimum": 0,
                                "description": "Effective size of the home in MiB (0: no "
                                "limit); a change applies to the next home made (provision "
                                "or restore)."},
        "archive": _object({"key": {"type": "string"},
                            "size": {"type": ["integer", "null"], "minimum": 0},
                            "sha256": {"type": ["string", "null"]},
                            "created_at": _TIME_OR_NULL}, nullable=True),
        "error": _object({"message": {"type": "string"},
                          "count": {"type": "integer", "minimum": 0},
                          "at": _TIME_OR_NULL}, nullable=True),
        "progress": _object({"phase": {"type": "string"},
                             "done": {"type": "integer", "minimum": 0},
                             "total": {"type": ["integer", "null"], "minimum": 0}},
                            nullable=True),
        "created_at": _TIME,
        "updated_at": _TIME,
    }),
    "WorkspacePage": _object({
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Workspace"}},
        "next_cursor": {"type": ["string", "null"],
                        "description": "Pass as `cursor` for the next page; null: last page."},
    }),
    "AccessLink": _object({"url": {"type": "string"}, "expires_at": _TIME}),
    "AuditEntry": _object({
        "id": {"type": "integer", "minimum": 1},
        "at": _TIME,
        "actor": {"type": "string", "description": "token:<first 12 hex digits of the "
                  "admin token's SHA-256>, or loopback (no token configured)."},
        "action": {"type": "string", "description": "The operation (operationId)."},
        "workspace_id": {"type": ["string", "null"]},
        "status": {"type": "integer", "description": "The HTTP status answered."},
        "request_id": {"type": "string"},
        "detail": {"type": "object", "description": "The validated request body."},
    }),
    "AuditPage": _object({
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEntry"}},
        "next_cursor": {"type": ["string", "null"],
                        "description": "Pass as `cursor` for the next (older) page; null: "
                        "last page."},
    }),
    "Error": _object({"error": _object({"code": {"type": "string"},
                                        "message": {"type": "string"}})}),
}

# --- the application context -------------------------------------------------------------


@dataclass(slots=True)
class _Context:
    config: Config
    token_digests: tuple[bytes, ...]
    doc: bytes
    origins: Origins
    signing_keys: gateway_auth.SigningKeys | None = None  # loaded on first use


_CTX = web.AppKey("api_context", _Context)


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None
          ) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers,
                        content_type="application/json")


def _error(exc: ApiError) -> web.Response:
    return _json({"error": {"code": exc.code, "message": exc.message}}, exc.status,
                 exc.headers or None)


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def workspace_json(ws: Workspace, cfg: Config) -> dict[str, Any]:
    """A workspace as the API shows it (README "Admin API"): TTLs are the effective values."""
    archive = None if ws.archive_key is None else {
        "key": ws.archive_key, "size": ws.archive_size, "sha256": ws.archive_sha256,
        "created_at": _iso(ws.archive_created_at)}
    error = None if ws.error_message is None else {
        "message": ws.error_message, "count": ws.error_count, "at": _iso(ws.error_at)}
    progress = None if ws.progress_phase is None else {
        "phase": ws.progress_phase, "done": ws.progress_done or 0, "total": ws.progress_total}
    return {
        "id": ws.id, "owner": ws.owner, "image": ws.image_ref,
        "desired_state": ws.desired_state.value, "status": ws.status.value,
        "operation": ws.operation.value, "last_access_at": _iso(ws.last_access_at),
        "warm_ttl_seconds": (cfg.reconciler.default_warm_ttl if ws.warm_ttl_seconds is None
                             else ws.warm_ttl_seconds),
        "cold_ttl_seconds": (cfg.reconciler.default_cold_ttl if ws.cold_ttl_seconds is None
                             else ws.cold_ttl_seconds),
        "home_size_limit_mib": (cfg.docker.home_size_limit_mib if ws.home_size_limit_mib is None
                                else ws.home_size_limit_mib),
        "archive": archive, "error": error, "progress": progress,
        "created_at": _iso(ws.created_at), "updated_at": _iso(ws.updated_at),
    }


# --- authentication ----------------------------------------------------------------------


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def token_matches(presented: str, digests: Sequence[bytes]) -> bool:
    """True when `presented` is one of the tokens. Every digest is compared, even after a
    match; digests are of equal length, so compare_digest's time says nothing either."""
    mine = token_digest(presented)
    found = False
    for expected in digests:
        found |= hmac.compare_digest(mine, expected)
    return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_PORT = re.compile(r"[0-9]{1,5}")


def is_loopback_host_header(value: str) -> bool:
    """True when a Host header names this machine's loopback: `localhost`, an address in
    127.0.0.0/8 or `[::1]`, each with an optional port. Nothing a DNS server (and so a
    rebinding attacker) answers for: no other name, not even `*.localhost`."""
    host = value.strip().lower()
    if host.startswith("["):
        literal, sep, rest = host[1:].partition("]")
        if not sep or (rest and not (rest[:1] == ":" and _PORT.fullmatch(rest[1:]))):
            return False
        try:
            return ipaddress.IPv6Address(literal).is_loopback
        except ValueError:
            return False
    name, sep, port = host.partition(":")
    if sep and _PORT.fullmatch(port) is None:
        return False  # also an unbracketed IPv6 address
    if name == "localhost":
        return True
    try:
        return ipaddress.IPv4Address(name).is_loopback
    except ValueError:
        return False


def _one(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, [])
    if len(values) > 1:
        raise ApiError(403, "cross_site" if name != "Host" else "forbidden_host",
                       f"more than one {name} header")
    return values[0] if values else None


def _guard_tokenless(request: web.Request) -> None:
    """The no-token mode's browser rules (module docstring): loopback Host, sent by no other
    origin, JSON only."""
    host = _one(request, "Host")
    if host is None or not is_loopback_host_header(host):
        raise ApiError(403, "forbidden_host",
                       "no admin token is configured: the admin API answers only requests "
                       "addressed to a loopback Host (localhost, 127.0.0.1, [::1]); got "
                       f"{'none' if host is None else repr(host[:100])}")
    # No web page has any business calling the API without a token, not even one of the
    # API's own origin: in path mode that origin also serves every workspace's pages.
    origin = _one(request, "Origin")
    if origin is not None:
        raise ApiError(403, "cross_site",
                       "no admin token is configured: refusing a request a web page sent "
                       f"(Origin {origin[:100]!r}); use the CLI or curl, or configure a token")
    site = _one(request, "Sec-Fetch-Site")
    if site is not None and site.strip().lower() != "none":
        raise ApiError(403, "cross_site",
                       "no admin token is configured: refusing a request a web page sent "
                       f"(Sec-Fetch-Site {site[:40]!r}); use the CLI or curl, or configure "
                       "a token")
    ctype = request.headers.get("Content-Type")
    media = None if ctype is None else ctype.partition(";")[0].strip().lower()
    if media != "application/json" and (ctype is not None or request.body_exists):
        raise ApiError(415, "unsupported_media_type",
                       "no admin token is configured: a request body must be sent as "
                       "Content-Type: application/json"
                       + ("" if ctype is None else f" (got {ctype[:100]!r})"))


def _authenticate(request: web.Request, ctx: _Context) -> str:
    """The actor of an authenticated request (audit.py names it); ApiError otherwise."""
    if not ctx.token_digests:
        proxied = "Forwarded" in request.headers or "X-Forwarded-For" in request.headers
        if request.remote is None or not is_loopback(request.remote) or proxied:
            raise ApiError(403, "api_disabled",
                           "no admin token is configured (auth.admin_tokens): the admin "
                           "API only answers direct loopback clients")
        _guard_tokenless(request)
        return audit.LOOPBACK_ACTOR
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise ApiError(401, "unauthorized",
                       "missing credentials: send Authorization: Bearer <admin token>",
                       {"WWW-Authenticate": 'Bearer realm="codehub"'})
    if not token_matches(presented, ctx.token_digests):
        raise ApiError(401, "unauthorized", "invalid admin token",
                       {"WWW-Authenticate": 'Bearer realm="codehub", error="invalid_token"'})
    return audit.token_actor(presented)


# --- helpers for handlers ----------------------------------------------------------------


def _ctx(request: web.Request) -> _Context:
    return request.config_dict[_CTX]


def _store(request: web.Request) -> Store:
    return request.config_dict[keys.STORE]


async def _changed(request: web.Request, workspace_id: str) -> None:
    await request.config_dict[keys.HINTS].publish(workspace_id)


async def _load(request: web.Request, workspace_id: str) -> Workspace:
    ws = await _store(request).get(workspace_id)
    if ws is None:
        raise ApiError(404, "not_found", f"no workspace {workspace_id}")
    return ws


def _refuse_if_deleting(ws: Workspace) -> None:
    if ws.desired_state is DesiredState.DELETED or ws.status is Status.DELETED:
        raise ApiError(409, "deleting", f"workspace {ws.id} is being deleted")


_UP = (DesiredState.RUNNING, DesiredState.WARM)
_TIER = {DesiredState.DELETED: 0, DesiredState.COLD: 1, DesiredState.WARM: 2,
         DesiredState.RUNNING: 3}


def _restore_needed(ws: Workspace) -> bool:
    """COLD, or on its way there, and nobody asked for a restore yet."""
    settled = ws.error_from_status if ws.status is Status.ERROR else ws.status
    return ws.desired_state is DesiredState.COLD and (
        settled is Status.COLD or ws.operation is Operation.ARCHIVING)


def check_patch(ws: Workspace, desired: DesiredState | None) -> None:
    """Refuse a PATCH the state machine does not allow (pure; raises ApiError 409)."""
    _refuse_if_deleting(ws)
    if desired in _UP and _restore_needed(ws):
        how = f"POST {PREFIX}/workspaces/{ws.id}/restore"
        if ws.operation is Operation.ARCHIVING:
            raise ApiError(409, "restore_required",
                           f"workspace {ws.id} is being archived; once it is COLD it comes "
                           f"back only through a restore: {how}")
        raise ApiError(409, "restore_required",
                       f"workspace {ws.id} is archived (COLD); it comes back only through a "
                       f"restore: {how}")


def check_restore(ws: Workspace) -> None:
    _refuse_if_deleting(ws)
    if ws.status is Status.ERROR:
        raise ApiError(409, "in_error",
                       f"workspace {ws.id} is in ERROR ({ws.error_message}); retry it first: "
                       f"POST {PREFIX}/workspaces/{ws.id}/retry")
    if ws.status is not Status.COLD:
        raise ApiError(409, "not_cold",
                       f"workspace {ws.id} is {ws.status.value}; only a COLD workspace can be "
                       "restored")


async def _update(request: web.Request, workspace_id: str,
                  check: Callable[[Workspace], None],
                  desired: DesiredState | None, ttls: dict[str, int | None]
                  ) -> tuple[Workspace, Workspace]:
    """Check the row and write the change as a compare-and-set against what was checked;
    (before, after). A row that moved in between is re-read and re-checked."""
    store = _store(request)
    for _ in range(_CAS_TRIES):
        ws = await _load(request, workspace_id)
        check(ws)
        same_ttls = all(getattr(ws, k) == v for k, v in ttls.items())
        if (desired is None or desired is ws.desired_state) and same_ttls:
            return ws, ws  # nothing to change: no write, no generation bump
        # Asking for a higher tier restarts the idle time: without this a restore of a
        # long-idle workspace would be swept straight back to COLD.
        wake = desired is not None and _TIER[desired] > _TIER[ws.desired_state]
        new = await store.update_spec(
            workspace_id, expect_desired=ws.desired_state, expect_status=ws.status,
            expect_operation=ws.operation, desired_state=desired, ttls=ttls, touch=wake)
        if new is not None:
            await _changed(request, workspace_id)
            return ws, new
    raise ApiError(409, "conflict", f"workspace {workspace_id} kept changing; try again")


def _encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).rstrip(b"=").decode()


_CURSOR_ID = Field("cursor", _ID, "")


def _decode_cursor(cursor: str | None) -> str | None:
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        return str(_CURSOR_ID.check(raw))
    except (binascii.Error, UnicodeDecodeError, ValueError, ApiError):
        raise invalid("cursor: not a cursor returned by this API", "invalid_cursor") from None


def _new_id() -> str:
    return "ws-" + secrets.token_hex(5)


# --- handlers ----------------------------------------------------------------------------


async def create_workspace(request: web.Request, args: Args) -> web.Response:
    body, cfg = args.body, _ctx(request).config
    given = body.get("id")
    for _ in range(1 if given else 3):
        try:
            ws = await _store(request).create(
                id=given or _new_id(), owner=body["owner"],
                image_ref=body.get("image") or cfg.docker.workspace_image,
                desired_state=DesiredState(body.get("desired_state", "RUNNING")),
                warm_ttl_seconds=body.get("warm_ttl_seconds"),
                cold_ttl_seconds=body.get("cold_ttl_seconds"),
                home_size_limit_mib=body.get("home_size_limit_mib"))
            break
        except AlreadyExists:
            continue
    else:
        raise ApiError(409, "already_exists",
                       f"workspace {given} already exists (a deleted one keeps its id until "
                       "it is purged)" if given else "no free generated id; try again")
    log.info("api: created workspace %s (owner %s, desired %s)", ws.id, ws.owner,
             ws.desired_state.value)
    if _CALL in request:
        request[_CALL].workspace_id = ws.id
    await _changed(request, ws.id)
    return _json(workspace_json(ws, cfg), 201,
                 {"Location": f"{PREFIX}/workspaces/{ws.id}"})


async def list_workspaces(request: web.Request, args: Args) -> web.Response:
    q = args.query
    limit: int = q["limit"]
    rows = await _store(request).list_page(
        status=Status(q["status"]) if "status" in q else None, owner=q.get("owner"),
        after_id=_decode_cursor(q.get("cursor")), limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    cfg = _ctx(request).config
    return _json({"items": [workspace_json(ws, cfg) for ws in rows],
                  "next_cursor": _encode_cursor(rows[-1].id) if more else None})


async def get_workspace(request: web.Request, args: Args) -> web.Response:
    ws = await _load(request, args.path["id"])
    return _json(workspace_json(ws, _ctx(request).config))


async def patch_workspace(request: web.Request, args: Args) -> web.Response:
    body = args.body
    desired = DesiredState(body["desired_state"]) if "desired_state" in body else None
    ttls: dict[str, int | None] = {
        k: body[k] for k in SETTINGS if k in body}
    before, after = await _update(request, args.path["id"],
                                  lambda ws: check_patch(ws, desired), desired, ttls)
    moved = after.desired_state is not before.desired_state
    if after is not before:
        log.info("api: workspace %s updated: %s", after.id, body)
    return _json(workspace_json(after, _ctx(request).config), 202 if moved else 200)


async def delete_workspace(request: web.Request, args: Args) -> web.Response:
    ws = await _load(request, args.path["id"])
    if ws.desired_state is not DesiredState.DELETED:
        new = await _store(request).set_desired(ws.id, DesiredState.DELETED)
        if new is None:
            raise ApiError(404, "not_found", f"no workspace {ws.id}")
        ws = new
        log.info("api: workspace %s asked to be deleted", ws.id)
        await _changed(request, ws.id)
    return _json(workspace_json(ws, _ctx(request).config), 202)


async def restore_workspace(request: web.Request, args: Args) -> web.Response:
    target = DesiredState.RUNNING if args.body.get("start") else DesiredState.WARM
    _, after = await _update(request, args.path["id"], check_restore, target, {})
    log.info("api: workspace %s asked to restore to %s", after.id, target.value)
    return _json(workspace_json(after, _ctx(request).config), 202)


async def retry_workspace(request: web.Request, args: Args) -> web.Response:
    store = _store(request)
    for _ in range(_CAS_TRIES):
        ws = await _load(request, args.path["id"])
        _refuse_if_deleting(ws)
        if ws.status is not Status.ERROR:
            raise ApiError(409, "not_in_error",
                           f"workspace {ws.id} is {ws.status.value}, not ERROR: nothing to retry")
        if ws.error_from_status is None:
            raise ApiError(409, "cannot_retry",
                           f"workspace {ws.id} does not record the status it failed from")
        new = await store.compare_and_set(
            ws.id, expect_status=Status.ERROR, expect_operation=ws.operation,
            status=ws.error_from_status, error_from_status=None, error_count=0,
            error_message=None, error_at=None, next_retry_at=None)
        if new is not None:
            log.info("api: workspace %s retried: back to %s (last error: %s)", ws.id,
                     new.status.value, ws.error_message)
            await _changed(request, ws.id)
            return _json(workspace_json(new, _ctx(request).config), 202)
    raise ApiError(409, "conflict", f"workspace {args.path['id']} kept changing; try again")


async def create_access_link(request: web.Request, args: Args) -> web.Response:
    ctx = _ctx(request)
    ws = await _load(request, args.path["id"])
    _refuse_if_deleting(ws)
    if ctx.signing_keys is None:
        ctx.signing_keys = gateway_auth.load_keys(ctx.config)
    ttl = args.body.get("ttl_seconds") or ctx.config.auth.link_ttl
    token = gateway_auth.mint_access_link(ctx.signing_keys, ws.id, ws.access_nonce, ttl,
                                          time.time())
    expires = datetime.fromtimestamp(gateway_auth.link_expiry(token), UTC)
    log.info("api: access link minted for workspace %s (valid %ds, once)", ws.id, ttl)
    return _json({"url": ctx.origins.access_url(ws.id, token, str(request.url.origin())),
                  "expires_at": _iso(expires)}, 201)


async def revoke_access(request: web.Request, args: Args) -> web.Response:
    ws = await _store(request).revoke_access(args.path["id"])
    if ws is None:
        raise ApiError(404, "not_found", f"no workspace {args.path['id']}")
    log.info("api: access to workspace %s revoked: every link and cookie made before is "
             "refused", ws.id)
    await _changed(request, ws.id)
    return _json(workspace_json(ws, _ctx(request).config))


async def list_audit(request: web.Request, args: Args) -> web.Response:
    q = args.query
    limit: int = q["limit"]
    cursor = q.get("cursor")
    rows = await audit.AuditLog(_store(request)).page(
        before_id=int(cursor) if cursor else None, limit=limit + 1,
        workspace_id=q.get("workspace_id"), actor=q.get("actor"))
    more = len(rows) > limit
    rows = rows[:limit]
    return _json({"items": [{"id": e.id, "at": _iso(e.at), "actor": e.actor,
                             "action": e.action, "workspace_id": e.workspace_id,
                             "status": e.status, "request_id": e.request_id,
                             "detail": e.detail} for e in rows],
                  "next_cursor": str(rows[-1].id) if more else None})


async def openapi_json(request: web.Request, args: Args) -> web.Response:
    return web.Response(body=_ctx(request).doc, content_type="application/json")


# --- the table ---------------------------------------------------------------------------

_ID_PARAM = Field("id", _ID, "Workspace id (lower-case DNS label, 1-63 characters).",
                  required=True)
_DESIRED_DOC = "The tier the reconciler should move the workspace to."
_WARM_TTL = Field("warm_ttl_seconds", _TTL,
                  "Idle seconds before RUNNING steps down to WARM; null: the global default.")
_COLD_TTL = Field("cold_ttl_seconds", _TTL,
                  "Idle seconds before WARM steps down to COLD; null: the global default.")
_HOME_SIZE = Field("home_size_limit_mib",
                   {"type": ["integer", "null"], "minimum": HOME_MIN_MIB, "maximum": 1 << 30},
                   "Size of the home in MiB (its own file system); null: the global "
                   "docker.home_size_limit_mib. Applies to the next home made: the first "
                   "provision, or the next restore.")


def _route(method: str, path: str, name: str, summary: str, handler: Any,
           ok: Sequence[Reply], *, conflict: str | None = None, **kw: Any) -> Route:
    """A Route with the error replies its shape implies (400/401/403/404/409/413/415)."""
    replies = list(ok)
    has_input = bool(kw.get("path_params") or kw.get("query") or kw.get("body"))
    if has_input:
        replies.append(Reply(400, "Invalid parameter or body.", "Error"))
    if kw.get("auth", True):
        replies.append(Reply(401, "Missing or invalid admin token.", "Error"))
        replies.append(Reply(403, "No token configured, and the client is not a direct "
                             "loopback client (api_disabled), the Host is not a loopback "
                             "name or address (forbidden_host), or a web page sent the "
                             "request: Origin, or Sec-Fetch-Site other than none "
                             "(cross_site).", "Error"))
    if kw.get("path_params"):
        replies.append(Reply(404, "No such workspace.", "Error"))
    if conflict:
        replies.append(Reply(409, conflict, "Error"))
    if kw.get("body"):
        replies.append(Reply(413, "Request body too large.", "Error"))
    if kw.get("auth", True):
        replies.append(Reply(415, "No token configured, and the request has a body or a "
                             "Content-Type that is not application/json "
                             "(unsupported_media_type).", "Error"))
        # every authenticated route reads the database
        replies.append(Reply(503, "The database is unavailable; retry (Retry-After).",
                             "Error"))
    return Route(method, path, name, summary, handler, tuple(replies), **kw)


ROUTES: tuple[Route, ...] = (
    _route("POST", "/workspaces", "createWorkspace", "Create a workspace", create_workspace,
           [Reply(201, "Created; the reconciler provisions it.", "Workspace")],
           conflict="A workspace with this id exists.",
           body=Body((
               Field("id", _ID, "Workspace id; generated (ws-<hex>) when left out."),
               Field("owner", {"type": "string", "minLength": 1, "maxLength": 128,
                               "pattern": OWNER_PATTERN}, "Owner (a user name).",
                     required=True),
               Field("image", {"type": "string", "minLength": 1, "maxLength": 255,
                               "pattern": IMAGE_PATTERN},
                     "Image reference; default docker.workspace_image."),
               Field("desired_state", {"type": "string", "enum": ["RUNNING", "WARM"],
                                       "default": "RUNNING"}, _DESIRED_DOC),
               _WARM_TTL, _COLD_TTL, _HOME_SIZE), "The new workspace.")),
    _route("GET", "/workspaces", "listWorkspaces", "List workspaces (by id, paged)",
           list_workspaces,
           [Reply(200, "A page of workspaces ordered by id.", "WorkspacePage")],
           query=(
               Field("status", {"type": "string", "enum": [s.value for s in Status]},
                     "Only workspaces with this status."),
               Field("owner", {"type": "string", "minLength": 1, "maxLength": 128,
                               "pattern": OWNER_PATTERN}, "Only workspaces of this owner."),
               Field("limit", {"type": "integer", "minimum": 1, "maximum": PAGE_MAX,
                               "default": PAGE_DEFAULT}, "Page size."),
               Field("cursor", {"type": "string", "minLength": 1, "maxLength": 128,
                                "pattern": r"^[A-Za-z0-9_-]+$"},
                     "next_cursor of the previous page."))),
    _route("GET", "/workspaces/{id}", "getWorkspace", "One workspace", get_workspace,
           [Reply(200, "The workspace.", "Workspace")], path_params=(_ID_PARAM,)),
    _route("PATCH", "/workspaces/{id}", "updateWorkspace",
           "Change desired state and/or TTLs", patch_workspace,
           [Reply(200, "Updated; desired_state unchanged.", "Workspace"),
            Reply(202, "desired_state changed; the reconciler works towards it.",
                  "Workspace")],
           conflict="Not allowed in the workspace's state (being deleted; COLD needs a "
                    "restore).",
           path_params=(_ID_PARAM,),
           body=Body((
               Field("desired_state", {"type": "string", "enum": ["RUNNING", "WARM", "COLD"]},
                     _DESIRED_DOC + " RUNNING/WARM of a COLD workspace: use restore."),
               _WARM_TTL, _COLD_TTL, _HOME_SIZE), "What to change (at least one field).",
               min_fields=1)),
    _route("DELETE", "/workspaces/{id}", "deleteWorkspace", "Delete a workspace",
           delete_workspace,
           [Reply(202, "desired_state is DELETED; the reconciler purges it, then the row "
                  "goes (idempotent).", "Workspace")], path_params=(_ID_PARAM,)),
    _route("POST", "/workspaces/{id}/restore", "restoreWorkspace",
           "Restore a COLD workspace to WARM (or RUNNING)", restore_workspace,
           [Reply(202, "Restore requested.", "Workspace")],
           conflict="Not COLD, in ERROR, or being deleted.", path_params=(_ID_PARAM,),
           body=Body((Field("start", {"type": "boolean", "default": False},
                            "Continue to RUNNING once restored."),),
                     "Optional options.", optional=True)),
    _route("POST", "/workspaces/{id}/retry", "retryWorkspace",
           "Return a workspace in ERROR to the status it failed from", retry_workspace,
           [Reply(202, "Back to its previous status; the failed operation resumes.",
                  "Workspace")],
           conflict="Not in ERROR, or being deleted.", path_params=(_ID_PARAM,)),
    _route("POST", "/workspaces/{id}/access-links", "createAccessLink",
           "Mint a signed, expiring link that opens the workspace in a browser",
           create_access_link, [Reply(201, "The link.", "AccessLink")],
           conflict="Being deleted.", path_params=(_ID_PARAM,),
           body=Body((Field("ttl_seconds", {"type": "integer", "minimum": LINK_TTL_MIN,
                                            "maximum": LINK_TTL_MAX},
                            "Seconds the link stays valid; default auth.link_ttl."),),
                     "Optional options.", optional=True)),
    _route("POST", "/workspaces/{id}/revoke-access", "revokeAccess",
           "Invalidate every access link and cookie of the workspace", revoke_access,
           [Reply(200, "Revoked: every gateway refuses the earlier links and cookies once "
                  "it has the hint (or at the latest after gateway.route_ttl).",
                  "Workspace")], path_params=(_ID_PARAM,)),
    _route("GET", "/audit", "listAudit", "The audit log, newest first (paged)", list_audit,
           [Reply(200, "A page of audit entries, newest first.", "AuditPage")],
           query=(
               Field("workspace_id", _ID, "Only entries about this workspace."),
               Field("actor", {"type": "string", "minLength": 1, "maxLength": 64,
                               "pattern": r"^[A-Za-z0-9:._@+-]+$"}, "Only entries of this actor."),
               Field("limit", {"type": "integer", "minimum": 1, "maximum": PAGE_MAX,
                               "default": PAGE_DEFAULT}, "Page size."),
               Field("cursor", {"type": "string", "minLength": 1, "maxLength": 19,
                                "pattern": r"^[1-9][0-9]*$"},
                     "next_cursor of the previous page."))),
    _route("GET", "/openapi.json", "getOpenApi", "This document (no token needed)",
           openapi_json, [Reply(200, "The OpenAPI 3.1 document.")], auth=False),
)

DESCRIPTION = (
    "CodeHub's admin API. Declarative: requests change a workspace's desired state or "
    "TTLs and return at once; the reconciler does the work. Ids: " + ID_PATTERN + ". "
    "A COLD workspace comes back only through restore. Errors: "
    '{"error": {"code", "message"}}.')


def build_document() -> dict[str, Any]:
    return document(ROUTES, prefix=PREFIX, title="CodeHub admin API", version=VERSION,
                    description=DESCRIPTION, schemas=SCHEMAS)


# --- wiring ------------------------------------------------------------------------------

_UNAVAILABLE = (OSError, TimeoutError, asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError, asyncpg.CannotConnectNowError)
_METHODS = frozenset({"GET", "POST", "PATCH", "DELETE", "PUT", "HEAD", "OPTIONS"})
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


@dataclass(slots=True)
class _Call:
    """An authenticated call, for the audit log (recorded by `_errors` once answered)."""

    actor: str
    action: str
    workspace_id: str | None
    detail: dict[str, Any]


_CALL = web.RequestKey("api_call", _Call)


def _bind(route: Route) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        if route.auth and route.name != "listAudit":  # reading the log is not recorded
            actor = _authenticate(request, request.app[_CTX])
            wid = request.match_info.get("id")
            request[_CALL] = _Call(actor, route.name, wid if wid and WORKSPACE_ID.fullmatch(
                wid) else None, {})
        elif route.auth:
            _authenticate(request, request.app[_CTX])
        path = validate_path(route, request.match_info)
        query = validate_query(route, request.query)
        body = validate_body(route, await read_body(request)) if route.body else {}
        if _CALL in request:
            request[_CALL].detail = body
        return await route.handler(request, Args(path, query, body))
    handle.__name__ = route.name
    return handle


class _Outage:
    """The database outage as the API saw it: logged when it starts and when it ends."""

    def __init__(self) -> None:
        self.failures = 0

    def failed(self, what: str) -> None:
        if not self.failures:
            log.warning("api: database unavailable, answering 503 until it returns (%s)", what)
        self.failures += 1

    def answered(self) -> None:
        if self.failures:
            log.info("api: database available again after %d request(s) got 503",
                     self.failures)
            self.failures = 0


_outage = _Outage()


@web.middleware
async def _errors(request: web.Request, handler: web_types.Handler) -> web.StreamResponse:
    """JSON errors for everything under the prefix, the request counter, the request id
    (X-Request-Id: the client's when well-formed, else a new one; answered back), and the
    audit record of every authenticated call."""
    resource = request.match_info.route.resource
    rid = request_id_of(request.headers.get("X-Request-Id"))
    REQUEST_ID.set(rid)
    WORKSPACE_ID_VAR.set(request.match_info.get("id"))
    try:
        resp = await handler(request)
    except ApiError as exc:
        resp = _error(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        resp = _error(ApiError(exc.status, _HTTP_CODES.get(exc.status, "http_error"),
                               f"{exc.reason}: {request.method} {request.path[:200]}",
                               headers))
    except _UNAVAILABLE as exc:
        _outage.failed(f"{request.method} {request.path[:200]}: {exc or type(exc).__name__}")
        resp = _error(ApiError(503, "unavailable", "the database is unavailable; retry",
                               {"Retry-After": "2"}))
    except Exception:
        log.exception("api: %s %s failed", request.method, request.path)
        resp = _error(ApiError(500, "internal", "internal error; see the server log"))
    if resp.status < 500:
        _outage.answered()
    API_REQUESTS.labels(resource.canonical if resource is not None else "unmatched",
                        request.method if request.method in _METHODS else "OTHER",
                        str(resp.status)).inc()
    resp.headers["X-Request-Id"] = rid
    call = request.get(_CALL)
    if call is not None:
        await audit.AuditLog(_store(request)).record(audit.Entry(
            call.actor, call.action, call.workspace_id, resp.status, rid, call.detail))
    return resp


def _check_exposure(cfg: Config) -> None:
    n = len(cfg.auth.admin_tokens)
    if n:
        log.info("admin API: bearer token required (%d token(s) configured)", n)
        return
    if is_loopback(cfg.server.host):
        log.warning("admin API: no auth.admin_tokens configured; server.host %s is loopback, "
                    "so the API answers direct loopback clients without a token, and only "
                    "requests with a loopback Host (localhost, 127.0.0.0/8, [::1]; else 403 "
                    "forbidden_host), sent by no web page (no Origin, Sec-Fetch-Site at most "
                    "none; else 403 cross_site) and with JSON bodies only (else 415 "
                    "unsupported_media_type): a web page cannot drive it (CSRF, DNS "
                    "rebinding)", cfg.server.host)
        return
    log.error("admin API: no auth.admin_tokens configured and server.host %s is not "
              "loopback: refusing to start", cfg.server.host)
    raise ConfigError(
        f"auth.admin_tokens: empty while server.host={cfg.server.host!r} is not a loopback "
        "address; set a token (e.g. CODEHUB_AUTH__ADMIN_TOKENS) or listen on 127.0.0.1")


def setup(app: web.Application) -> None:
    """Mount the API at /api/v1 as a sub-application (its middleware touches nothing else).

    Needs `keys.CONFIG` now, and `keys.STORE` and `keys.HINTS` by the first request.
    Raises ConfigError when no token is configured and the listener is not loopback."""
    cfg = app[keys.CONFIG]
    _check_exposure(cfg)
    api = web.Application(middlewares=[_errors])
    api[_CTX] = _Context(
        config=cfg, token_digests=tuple(token_digest(t) for t in cfg.auth.admin_tokens),
        doc=orjson.dumps(build_document()),
        origins=Origins(cfg.server.public_url, cfg.gateway.workspace_host))
    for route in ROUTES:
        api.router.add_route(route.method, route.path, _bind(route), name=route.name)
    app.add_subapp(PREFIX, api)
