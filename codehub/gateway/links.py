"""`POST /api/v1/workspaces/{id}/access-links`: mint a signed, expiring access link.

Guarantees:
- Needs `Authorization: Bearer <token>` matching one of `auth.admin_tokens`, compared with
  hmac.compare_digest; no configured token means every call is refused (401).
- Body `{"ttl_seconds"?: int}` (1 .. 30 days, default auth.link_ttl); answers 201
  `{"url", "expires_at"}` for an existing workspace, 404 otherwise. Errors are
  `{"error": {"code", "message"}}`.
- The URL is the workspace's origin + `/?access=<token>` in host mode; in path mode
  `server.public_url` + `/w/{id}/?access=<token>`, or built from the request's scheme and
  Host when no public URL is configured (origins.Origins.access_url).

The admin API (api.py) owns this route once it exists; it calls `mint_access_link` the
same way, and this module then only serves the gateway's own tests.
"""

from __future__ import annotations

import hmac
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from .. import keys
from . import auth

MAX_TTL = 30 * 86400


def _error(status: int, code: str, message: str) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        body=orjson.dumps({"error": {"code": code, "message": message}}))


def bearer_ok(header: str | None, tokens: list[str]) -> bool:
    if not header or not header.startswith("Bearer ") or not tokens:
        return False
    given = header[7:].strip().encode()
    ok = False
    for token in tokens:  # every token is compared: the time does not tell which matched
        ok |= hmac.compare_digest(given, token.encode())
    return ok


async def create_access_link(request: web.Request) -> web.Response:
    from . import GATEWAY  # the package imports this module: resolved at call time

    cfg = request.app[keys.CONFIG]
    if not bearer_ok(request.headers.get("Authorization"), cfg.auth.admin_tokens):
        return _error(401, "unauthorized", "a valid admin bearer token is required")
    workspace_id = request.match_info["wid"]
    ttl: Any = cfg.auth.link_ttl
    if request.can_read_body:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "invalid_json", "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "invalid_body", "the body must be a JSON object")
        ttl = body.get("ttl_seconds", ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_TTL:
        return _error(400, "invalid_ttl", f"ttl_seconds must be an integer in 1..{MAX_TTL}")
    gw = request.app[GATEWAY]
    ws = await gw.store.get(workspace_id)
    if ws is None:
        return _error(404, "not_found", f"no workspace {workspace_id!r}")
    now = time.time()
    token = auth.mint_access_link(gw.keys, workspace_id, ws.access_nonce, ttl, now)
    expires = datetime.fromtimestamp(auth.link_expiry(token), UTC)
    return web.Response(status=201, content_type="application/json", body=orjson.dumps({
        "url": gw.origins.access_url(workspace_id, token,
                                     f"{request.scheme}://{request.host}"),
        "expires_at": expires.isoformat().replace("+00:00", "Z"),
    }))


def setup(app: web.Application) -> None:
    app.router.add_post("/api/v1/workspaces/{wid}/access-links", create_access_link)
