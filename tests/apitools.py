"""An Application with the admin API and /metrics on a real database, for tests.

Built the way app.py wires it, minus Docker and the reconciler: a pool on the test's
database (migrated), the Store, an in-process hint bus that also records what was
published, and `api.setup` + `metrics.setup`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg
from aiohttp import web

from codehub import api, keys, metrics, store
from codehub.config import AuthConfig, Config, ServerConfig
from codehub.hints import InProcessHintBus

TOKEN = "test-admin-token-0123456789"
OTHER_TOKEN = "second-admin-token-abcdef"
SIGNING_KEY = "test-signing-key-for-links"

T = TypeVar("T")


class RecordingHintBus(InProcessHintBus):
    """The in-process bus, remembering every id published (in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[str] = []

    async def publish(self, workspace_id: str) -> None:
        self.published.append(workspace_id)
        await super().publish(workspace_id)


def make_config(*, tokens: tuple[str, ...] = (TOKEN,), host: str = "127.0.0.1",
                data_dir: str = "", **sections: Any) -> Config:
    sections.setdefault("server", ServerConfig(host=host))
    auth = AuthConfig(admin_tokens=list(tokens), signing_keys=[SIGNING_KEY])
    cfg = Config(auth=auth, **sections)
    return dataclasses.replace(cfg, data_dir=data_dir) if data_dir else cfg


async def make_app(database_url: str, cfg: Config | None = None) -> web.Application:
    cfg = cfg or make_config()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await store.migrate(conn)
    app = web.Application()
    app[keys.CONFIG] = cfg
    app[keys.POOL] = pool
    app[keys.STORE] = store.Store(pool)
    app[keys.HINTS] = RecordingHintBus()
    api.setup(app)
    metrics.setup(app)

    async def close_pool(_: web.Application) -> None:
        await pool.close()

    app.on_cleanup.append(close_pool)
    return app


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class LiveServer:
    """The app served on a loopback port by a private event loop in its own thread, for
    synchronous clients (the CLI, schemathesis/requests) that would block the test's loop."""

    def __init__(self, database_url: str, cfg: Config | None = None) -> None:
        self.database_url = database_url
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-api",
                                       daemon=True)
        self.runner: web.AppRunner | None = None
        self.app: web.Application | None = None
        self.url = ""

    def __enter__(self) -> LiveServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _start(self) -> None:
        self.app = await make_app(self.database_url, self.cfg)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop (e.g. store calls to set up a scenario)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    @property
    def store(self) -> store.Store:
        assert self.app is not None
        return self.app[keys.STORE]
