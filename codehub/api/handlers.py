"""The admin API's handlers: validate, write desired state or TTLs, hint, answer at once.

Guarantees:
- No handler calls Docker or object storage; each state change is a compare-and-set
  against the exact row its checks were made on, re-read and re-checked (up to
  `_CAS_TRIES`) when the row moved in between: desired state and settings through
  desire.py, with the rules of model.py (the self-service page uses the same two).
- Listing pages by an opaque keyset cursor (base64url of the last id): rows created or
  deleted while a client pages never make it see one twice or miss one that existed.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
from datetime import UTC, datetime

from aiohttp import web

from .. import audit, desire, keys, model, revocations, signing
from ..model import DesiredState, Refusal, Status, Workspace
from ..openapi import (
    ApiError,
    Args,
    Field,
    invalid,
)
from ..store import SETTINGS, AlreadyExists
from .replies import CALL, context_of, iso, json_reply, store_of, workspace_json
from .schemas import _CAS_TRIES, ID_SCHEMA, PREFIX

log = logging.getLogger(__name__)

# --- helpers for handlers ----------------------------------------------------------------


async def _changed(request: web.Request, workspace_id: str) -> None:
    await request.config_dict[keys.HINTS].publish(workspace_id)


async def _load(request: web.Request, workspace_id: str) -> Workspace:
    ws = await store_of(request).get(workspace_id)
    if ws is None:
        raise ApiError(404, "not_found", f"no workspace {workspace_id}")
    return ws


def _refuse_if_deleting(ws: Workspace) -> None:
    if ws.desired_state is DesiredState.DELETED or ws.status is Status.DELETED:
        raise ApiError(409, "deleting", f"workspace {ws.id} is being deleted")


# The call that gets a refused wish through instead (the rules themselves are model.py's).
_INSTEAD = {"restore_required": "restore", "in_error": "retry"}


def refused(refusal: Refusal | None, workspace_id: str) -> None:
    """Raise the model's refusal as the API's 409, naming the call that helps."""
    if refusal is None:
        return
    message = refusal.message
    if refusal.code in _INSTEAD:
        message += f": POST {PREFIX}/workspaces/{workspace_id}/{_INSTEAD[refusal.code]}"
    raise ApiError(409, refusal.code, message)


def check_patch(ws: Workspace, desired: DesiredState | None) -> None:
    """Refuse a PATCH the state machine does not allow (pure; raises ApiError 409)."""
    refused(model.desire_refusal(ws, desired), ws.id)


def check_restore(ws: Workspace) -> None:
    refused(model.restore_refusal(ws), ws.id)


async def _update(request: web.Request, workspace_id: str, rule: desire.Rule,
                  desired: DesiredState | None, ttls: dict[str, int | None]
                  ) -> tuple[Workspace, Workspace]:
    """desire.change, its errors as the API's answers."""
    try:
        return await desire.change(store_of(request), request.config_dict[keys.HINTS],
                                   workspace_id, rule, desired, ttls)
    except desire.NotFound:
        raise ApiError(404, "not_found", f"no workspace {workspace_id}") from None
    except desire.Refused as exc:
        refused(exc.refusal, workspace_id)
        raise
    except desire.KeptChanging:
        raise ApiError(409, "conflict",
                       f"workspace {workspace_id} kept changing; try again") from None


def _encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).rstrip(b"=").decode()


_CURSOR_ID = Field("cursor", ID_SCHEMA, "")


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
    body, cfg = args.body, context_of(request).config
    given = body.get("id")
    for _ in range(1 if given else 3):
        try:
            ws = await store_of(request).create(
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
    if CALL in request:
        request[CALL].workspace_id = ws.id
    await _changed(request, ws.id)
    return json_reply(workspace_json(ws, cfg), 201,
                 {"Location": f"{PREFIX}/workspaces/{ws.id}"})


async def list_workspaces(request: web.Request, args: Args) -> web.Response:
    q = args.query
    limit: int = q["limit"]
    rows = await store_of(request).list_page(
        status=Status(q["status"]) if "status" in q else None, owner=q.get("owner"),
        after_id=_decode_cursor(q.get("cursor")), limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    cfg = context_of(request).config
    return json_reply({"items": [workspace_json(ws, cfg) for ws in rows],
                  "next_cursor": _encode_cursor(rows[-1].id) if more else None})


async def get_workspace(request: web.Request, args: Args) -> web.Response:
    ws = await _load(request, args.path["id"])
    return json_reply(workspace_json(ws, context_of(request).config))


async def patch_workspace(request: web.Request, args: Args) -> web.Response:
    body = args.body
    desired = DesiredState(body["desired_state"]) if "desired_state" in body else None
    ttls: dict[str, int | None] = {
        k: body[k] for k in SETTINGS if k in body}
    before, after = await _update(request, args.path["id"],
                                  lambda ws: model.desire_refusal(ws, desired), desired, ttls)
    moved = after.desired_state is not before.desired_state
    if after is not before:
        log.info("api: workspace %s updated: %s", after.id, body)
    return json_reply(workspace_json(after, context_of(request).config), 202 if moved else 200)


async def delete_workspace(request: web.Request, args: Args) -> web.Response:
    try:
        ws = await desire.delete(store_of(request), request.config_dict[keys.HINTS],
                                 args.path["id"])
    except desire.NotFound:
        raise ApiError(404, "not_found", f"no workspace {args.path['id']}") from None
    log.info("api: workspace %s asked to be deleted", ws.id)
    return json_reply(workspace_json(ws, context_of(request).config), 202)


async def restore_workspace(request: web.Request, args: Args) -> web.Response:
    target = DesiredState.RUNNING if args.body.get("start") else DesiredState.WARM
    _, after = await _update(request, args.path["id"], model.restore_refusal, target, {})
    log.info("api: workspace %s asked to restore to %s", after.id, target.value)
    return json_reply(workspace_json(after, context_of(request).config), 202)


async def retry_workspace(request: web.Request, args: Args) -> web.Response:
    store = store_of(request)
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
            return json_reply(workspace_json(new, context_of(request).config), 202)
    raise ApiError(409, "conflict", f"workspace {args.path['id']} kept changing; try again")


async def create_access_link(request: web.Request, args: Args) -> web.Response:
    ctx = context_of(request)
    ws = await _load(request, args.path["id"])
    _refuse_if_deleting(ws)
    if ctx.signing_keys is None:
        ctx.signing_keys = signing.load_keys(ctx.config)
    ttl = args.body.get("ttl_seconds") or ctx.config.auth.link_ttl
    token = signing.mint_access_link(ctx.signing_keys, ws.id, ws.access_nonce, ttl,
                                     time.time())
    expires = datetime.fromtimestamp(signing.link_expiry(token), UTC)
    log.info("api: access link minted for workspace %s (valid %ds, once)", ws.id, ttl)
    return json_reply({"url": ctx.origins.access_url(ws.id, token, str(request.url.origin())),
                  "expires_at": iso(expires)}, 201)


async def revoke_access(request: web.Request, args: Args) -> web.Response:
    ws = await store_of(request).revoke_access(args.path["id"])
    if ws is None:
        raise ApiError(404, "not_found", f"no workspace {args.path['id']}")
    log.info("api: access to workspace %s revoked: every link and cookie made before is "
             "refused", ws.id)
    await _changed(request, ws.id)
    return json_reply(workspace_json(ws, context_of(request).config))


async def revoke_sessions(request: web.Request, args: Args) -> web.Response:
    """Every sign-in session of the person issued until now stops working (on every
    replica within revocations.REFRESH); with `workspaces`, every workspace they own also
    has its access revoked, so the workspace cookies their sessions minted die too."""
    person: str = args.path["person"]
    if CALL in request:
        request[CALL].detail = {"person": person, **args.body}
    # sessions carry whole seconds: a session issued in this very second is refused too
    now = datetime.fromtimestamp(int(time.time()) + 1, UTC)
    db = store_of(request)
    not_before = await revocations.revoke(db, person, now)
    revoked: list[str] = []
    if args.body.get("workspaces"):
        after: str | None = None
        while True:
            page = await db.list_page(status=None, owner=person, after_id=after, limit=200)
            for ws in page:
                if await db.revoke_access(ws.id) is not None:
                    revoked.append(ws.id)
                    await _changed(request, ws.id)
            if len(page) < 200:
                break
            after = page[-1].id
    log.info("api: sign-in sessions of %s revoked (issued before %s); access revoked on %d "
             "workspace(s)", person, iso(not_before), len(revoked))
    return json_reply({"person": person, "not_before": iso(not_before),
                       "workspaces_revoked": revoked})


async def list_audit(request: web.Request, args: Args) -> web.Response:
    q = args.query
    limit: int = q["limit"]
    cursor = q.get("cursor")
    rows = await audit.AuditLog(store_of(request)).page(
        before_id=int(cursor) if cursor else None, limit=limit + 1,
        workspace_id=q.get("workspace_id"), actor=q.get("actor"))
    more = len(rows) > limit
    rows = rows[:limit]
    return json_reply({"items": [{"id": e.id, "at": iso(e.at), "actor": e.actor,
                             "action": e.action, "workspace_id": e.workspace_id,
                             "status": e.status, "request_id": e.request_id,
                             "detail": e.detail} for e in rows],
                  "next_cursor": str(rows[-1].id) if more else None})


async def openapi_json(request: web.Request, args: Args) -> web.Response:
    return web.Response(body=context_of(request).doc, content_type="application/json")


