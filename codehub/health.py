"""Liveness and readiness endpoints.

- `GET /healthz`: 200 while the process serves requests; touches nothing else.
- `GET /readyz`: 200 only when the database answers and every bundled migration is
  applied, and Redis answers when one is configured (`redis.url`); 503 with the reason
  otherwise, within about 2 s each (a hung server counts as not answering). Running
  workspaces keep being proxied while it says 503: it tells a load balancer or an
  operator that new work (wake-ups, the API) cannot be done here now. The body also
  says whether this replica is the reconciler's leader (`"leader": true|false`); every
  replica serves traffic either way.
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from . import keys, store
from .hints import RedisHintBus


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status,
                        content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    elector = app.get(keys.ELECTOR)
    body: dict[str, object] = {"leader": bool(elector and elector.is_leader)}
    try:
        async with asyncio.timeout(2):
            version = await store.schema_version(app[keys.POOL])
    except (store.StoreUnavailable, TimeoutError) as exc:
        body.update(status="unready", reason=f"database: {exc or type(exc).__name__}")
        return _json(body, 503)
    body["schema_version"] = version
    if version < store.LATEST_VERSION:
        body.update(status="unready",
                    reason=f"migrations: at {version}, expected {store.LATEST_VERSION}")
        return _json(body, 503)
    hints = app.get(keys.HINTS)
    if isinstance(hints, RedisHintBus) and not await hints.ping(timeout=2):
        body.update(status="unready", reason="redis: not answering")
        return _json(body, 503)
    body["status"] = "ready"
    return _json(body)


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
