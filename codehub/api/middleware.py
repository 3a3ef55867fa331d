"""The API's request path: authentication, validation, JSON errors, request ids, audit.

Guarantees:
- Everything under the prefix answers JSON errors: bad input 4xx (never 5xx), unknown
  paths and methods 404/405, a database outage 503 with Retry-After (logged once when it
  starts and once when it ends), anything else 500 without details.
- Every answer carries `X-Request-Id` (the client's when well-formed, logs.request_id_of)
  and every authenticated call is recorded in the audit log once answered (audit.py).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import typedefs as web_types
from aiohttp import web

from .. import audit
from ..logs import REQUEST_ID, WORKSPACE_ID_VAR, request_id_of
from ..metrics import API_REQUESTS
from ..model import WORKSPACE_ID
from ..openapi import (
    ApiError,
    Args,
    Route,
    read_body,
    validate_body,
    validate_path,
    validate_query,
)
from ..store import StoreUnavailable
from .replies import CALL, CONTEXT, Call, error_reply, store_of
from .security import authenticate

log = logging.getLogger(__name__)

# --- wiring ------------------------------------------------------------------------------

_METHODS = frozenset({"GET", "POST", "PATCH", "DELETE", "PUT", "HEAD", "OPTIONS"})
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}




def bind(route: Route) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        if route.auth and route.name != "listAudit":  # reading the log is not recorded
            actor = authenticate(request, request.app[CONTEXT])
            wid = request.match_info.get("id")
            request[CALL] = Call(actor, route.name, wid if wid and WORKSPACE_ID.fullmatch(
                wid) else None, {})
        elif route.auth:
            authenticate(request, request.app[CONTEXT])
        path = validate_path(route, request.match_info)
        query = validate_query(route, request.query)
        body = validate_body(route, await read_body(request)) if route.body else {}
        if CALL in request:
            request[CALL].detail = body
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
async def errors(request: web.Request, handler: web_types.Handler) -> web.StreamResponse:
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
        resp = error_reply(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        resp = error_reply(ApiError(exc.status, _HTTP_CODES.get(exc.status, "http_error"),
                               f"{exc.reason}: {request.method} {request.path[:200]}",
                               headers))
    except StoreUnavailable as exc:
        _outage.failed(f"{request.method} {request.path[:200]}: {exc or type(exc).__name__}")
        resp = error_reply(ApiError(503, "unavailable", "the database is unavailable; retry",
                               {"Retry-After": "2"}))
    except Exception:
        log.exception("api: %s %s failed", request.method, request.path)
        resp = error_reply(ApiError(500, "internal", "internal error; see the server log"))
    if resp.status < 500:
        _outage.answered()
    API_REQUESTS.labels(resource.canonical if resource is not None else "unmatched",
                        request.method if request.method in _METHODS else "OTHER",
                        str(resp.status)).inc()
    resp.headers["X-Request-Id"] = rid
    call = request.get(CALL)
    if call is not None:
        await audit.AuditLog(store_of(request)).record(audit.Entry(
            call.actor, call.action, call.workspace_id, resp.status, rid, call.detail))
    return resp


