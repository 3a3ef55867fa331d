"""Composition root: the one place that knows every concrete class.

Each resource is a `cleanup_ctx` generator: set up, yield, tear down. aiohttp runs the
teardowns in reverse order, also when a later set-up failed, so a failed start leaves
nothing running (an embedded database included).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiodocker
from aiohttp import web

from . import health, keys, postgres, store
from .config import Config
from .hints import InProcessHintBus, RedisHintBus

log = logging.getLogger(__name__)


def build_app(cfg: Config) -> web.Application:
    app = web.Application()
    app[keys.CONFIG] = cfg
    app.cleanup_ctx.extend([database_ctx, hints_ctx, docker_ctx])
    health.setup(app)
    return app


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG]
    async with postgres.database_url(cfg.database.url, cfg.data_path) as url:
        pool = await postgres.connect_pool(
            url, min_size=cfg.database.pool_min, max_size=cfg.database.pool_max,
            connect_timeout=cfg.database.connect_timeout)
        try:
            async with pool.acquire() as conn:
                applied = await store.migrate(conn)
            log.info("schema at version %d%s", store.LATEST_VERSION,
                     f" (applied {applied})" if applied else "")
            app[keys.POOL] = pool
            app[keys.STORE] = store.Store(pool)
            yield
        finally:
            await pool.close()


async def hints_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG]
    if not cfg.redis.url:
        log.info("hints: no redis.url configured; using the in-process hint bus (one replica)")
        app[keys.HINTS] = InProcessHintBus()
        yield
        return
    bus = RedisHintBus(cfg.redis.url)
    log.info("hints: redis %s (%s)", bus.channel,
             "reachable" if await bus.ping() else "UNREACHABLE for now; resync covers it")
    app[keys.HINTS] = bus
    try:
        yield
    finally:
        await bus.close()


async def docker_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG]
    docker = aiodocker.Docker(url=cfg.docker.url or None)
    try:
        version = await docker.version()
        log.info("docker: engine %s at %s", version.get("Version"), docker.docker_host)
    except (aiodocker.DockerError, OSError) as exc:
        log.warning("docker: engine at %s not answering (%s); workspaces cannot start "
                    "until it does", docker.docker_host, exc)
    app[keys.DOCKER] = docker
    try:
        yield
    finally:
        await docker.close()
