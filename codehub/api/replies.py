"""The API's application context, its JSON replies and the workspace as the API shows it.

Guarantees:
- Every reply is JSON (orjson); every error is `{"error": {"code", "message"}}`
  (`error_reply`); times are ISO 8601 UTC with a `Z`.
- A workspace is shown by view.workspace_json (shared with the self-service page).
- `Call` is what the audit log records of an authenticated call (`middleware.errors`
  records it once the call answered; a handler may name the workspace it created).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .. import keys, signing
from ..config import Config
from ..openapi import (
    ApiError,
)
from ..origins import Origins
from ..store import Store
from ..view import iso, workspace_json

log = logging.getLogger(__name__)

# --- the application context -------------------------------------------------------------


@dataclass(slots=True)
class Context:
    config: Config
    token_digests: tuple[bytes, ...]
    doc: bytes
    origins: Origins
    signing_keys: signing.SigningKeys | None = None  # loaded on first use


CONTEXT = web.AppKey("api_context", Context)


def json_reply(data: object, status: int = 200, headers: dict[str, str] | None = None
          ) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers,
                        content_type="application/json")


def error_reply(exc: ApiError) -> web.Response:
    return json_reply({"error": {"code": exc.code, "message": exc.message}}, exc.status,
                 exc.headers or None)


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


__all__ = ["CALL", "CONTEXT", "Call", "Context", "context_of", "error_reply", "iso",
           "json_reply", "store_of", "workspace_json"]
