"""The API's application context, its JSON replies and the workspace as the API shows it.

Guarantees:
- Every reply is JSON (orjson); every error is `{"error": {"code", "message"}}`
  (`error_reply`); times are ISO 8601 UTC with a `Z`.
- `workspace_json` shows effective TTLs and home size (the row's value, else the default).
- `Call` is what the audit log records of an authenticated call (`middleware.errors`
  records it once the call answered; a handler may name the workspace it created).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from .. import keys
from ..config import Config
from ..gateway import auth as gateway_auth
from ..gateway.origins import Origins
from ..model import Workspace
from ..openapi import (
    ApiError,
)
from ..store import Store

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

# --- the application context -------------------------------------------------------------


@dataclass(slots=True)
class Context:
    config: Config
    token_digests: tuple[bytes, ...]
    doc: bytes
    origins: Origins
    signing_keys: gateway_auth.SigningKeys | None = None  # loaded on first use


CONTEXT = web.AppKey("api_context", Context)


def json_reply(data: object, status: int = 200, headers: dict[str, str] | None = None
          ) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers,
                        content_type="application/json")


def error_reply(exc: ApiError) -> web.Response:
    return json_reply({"error": {"code": exc.code, "message": exc.message}}, exc.status,
                 exc.headers or None)


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def workspace_json(ws: Workspace, cfg: Config) -> dict[str, Any]:
    """A workspace as the API shows it (README "Admin API"): TTLs are the effective values."""
    archive = None if ws.archive_key is None else {
        "key": ws.archive_key, "size": ws.archive_size, "sha256": ws.archive_sha256,
        "created_at": iso(ws.archive_created_at)}
    error = None if ws.error_message is None else {
        "message": ws.error_message, "count": ws.error_count, "at": iso(ws.error_at)}
    progress = None if ws.progress_phase is None else {
        "phase": ws.progress_phase, "done": ws.progress_done or 0, "total": ws.progress_total}
    return {
        "id": ws.id, "owner": ws.owner, "image": ws.image_ref,
        "desired_state": ws.desired_state.value, "status": ws.status.value,
        "operation": ws.operation.value, "last_access_at": iso(ws.last_access_at),
        "warm_ttl_seconds": (cfg.reconciler.default_warm_ttl if ws.warm_ttl_seconds is None
                             else ws.warm_ttl_seconds),
        "cold_ttl_seconds": (cfg.reconciler.default_cold_ttl if ws.cold_ttl_seconds is None
                             else ws.cold_ttl_seconds),
        "home_size_limit_mib": (cfg.docker.home_size_limit_mib if ws.home_size_limit_mib is None
                                else ws.home_size_limit_mib),
        "archive": archive, "error": error, "progress": progress,
        "created_at": iso(ws.created_at), "updated_at": iso(ws.updated_at),
    }


def context_of(request: web.Request) -> Context:
    return request.config_dict[CONTEXT]


def store_of(request: web.Request) -> Store:
    return request.config_dict[keys.STORE]


@dataclass(slots=True)
class Call:
    """An authenticated call, for the audit log (recorded by `_errors` once answered)."""

    actor: str
    action: str
    workspace_id: str | None
    detail: dict[str, Any]


CALL = web.RequestKey("api_call", Call)
