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

Modules: `schemas.py` (constants, JSON Schemas), `routes.py` (the table), `handlers.py`,
`security.py` (tokens, the token-less rules), `middleware.py` (errors, request ids, the
audit record), `replies.py` (context, JSON replies, the workspace as shown).
"""

from __future__ import annotations

import orjson
from aiohttp import web

from .. import keys
from ..origins import Origins
from .middleware import bind, errors
from .replies import CONTEXT, Context, workspace_json
from .routes import ROUTES, build_document
from .schemas import (
    ID_PATTERN,
    LINK_TTL_MAX,
    LINK_TTL_MIN,
    PAGE_MAX,
    PREFIX,
    SCHEMAS,
    TTL_MAX,
    TTL_MIN,
)
from .security import check_exposure, is_loopback_host_header, token_digest, token_matches

__all__ = ["ID_PATTERN", "LINK_TTL_MAX", "LINK_TTL_MIN", "PAGE_MAX", "PREFIX", "ROUTES",
           "SCHEMAS", "TTL_MAX", "TTL_MIN", "build_document", "is_loopback_host_header",
           "setup", "token_digest", "token_matches", "workspace_json"]


def setup(app: web.Application) -> None:
    """Mount the API at /api/v1 as a sub-application (its middleware touches nothing else).

    Needs `keys.CONFIG` now, and `keys.STORE` and `keys.HINTS` by the first request.
    Raises ConfigError when no token is configured and the listener is not loopback."""
    cfg = app[keys.CONFIG]
    check_exposure(cfg)
    api = web.Application(middlewares=[errors])
    api[CONTEXT] = Context(
        config=cfg, token_digests=tuple(token_digest(t) for t in cfg.auth.admin_tokens),
        doc=orjson.dumps(build_document()),
        origins=Origins(cfg.server.public_url, cfg.gateway.workspace_host))
    for route in ROUTES:
        api.router.add_route(route.method, route.path, bind(route), name=route.name)
    app.add_subapp(PREFIX, api)

