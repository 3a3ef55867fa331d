"""Fixtures for the gateway tests: a real gateway in front of a real echo container.

- ``echo_upstream`` (module scope): one echo workspace container started with the real
  DockerInstanceController on a network of its own; every test of a module proxies to it.
  Its workspace id is ``ECHO_ID``.
- ``stack`` (function scope): a fresh database, an in-process hint bus, and the gateway
  served on a loopback port exactly as app.py wires it (gateway.setup + its cleanup
  context); helpers add workspace rows and mint cookies.

conftest.py of this folder exposes both fixtures.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import asyncpg
import pytest
from aiohttp import web
from harness import services

from codehub import api, gateway, health, keys, signing
from codehub.backends.docker.containers import DockerInstanceController
from codehub.clock import Clock
from codehub.config import AuthConfig, Config, DockerConfig, GatewayConfig, ServerConfig
from codehub.hints import InProcessHintBus
from codehub.interfaces import HintBus
from codehub.model import DesiredState, Operation, Status, Workspace
from codehub.store import Store, migrate

ECHO_ID = "echo"
SIGNING_KEY = "test-signing-key-one"
ADMIN_TOKEN = "test-admin-token"
NO_ROW_NONCE = "f" * 32


@dataclass(frozen=True)
class Upstream:
    docker_url: str
    prefix: str
    image: str
    network: str
    name_prefix: str


def controller(up: Upstream, docker: aiodocker.Docker) -> DockerInstanceController:
    return DockerInstanceController(docker=docker, network=up.network,
                                    name_prefix=up.name_prefix, start_timeout=60)


async def start_workspace_container(up: Upstream, workspace_id: str,
                                    image: str | None = None) -> None:
    docker = aiodocker.Docker(url=up.docker_url)
    try:
        volume = f"{up.prefix}-vol-{workspace_id}"
        await docker.volumes.create({"Name": volume})
        ctrl = controller(up, docker)
        try:
            await ctrl.start(workspace_id, image or up.image, volume)
        finally:
            await ctrl.close()
    finally:
        await docker.close()


@pytest.fixture(scope="module")
def echo_upstream(docker_engine: services.DockerEngine, workspace_image: str,
                  ) -> Iterator[Upstream]:
    prefix = f"g{uuid.uuid4().hex[:7]}"
    up = Upstream(docker_engine.url, prefix, workspace_image, f"{prefix}-net", f"{prefix}-ws-")
    try:
        services.run_async(lambda: start_workspace_container(up, ECHO_ID))
        yield up
    finally:
        services.docker_remove_named(docker_engine.url, prefix)


def make_config(tmp_path: Path, server: ServerConfig | None = None,
                auth_config: AuthConfig | None = None, **gateway_settings: Any) -> Config:
    settings: dict[str, Any] = {"activity_flush_interval": 0.2, "events_poll_interval": 0.2}
    settings.update(gateway_settings)
    return Config(
        data_dir=str(tmp_path),
        server=server or ServerConfig(),
        auth=auth_config or AuthConfig(signing_keys=[SIGNING_KEY], admin_tokens=[ADMIN_TOKEN]),
        gateway=GatewayConfig(**settings),
        docker=DockerConfig(),
    )


class Stack:
    """A running gateway and handles on what is behind it."""

    def __init__(self, app: web.Application, url: str, store: Store, bus: HintBus,
                 up: Upstream, cfg: Config) -> None:
        self.app = app
        self.base = url
        self.store = store
        self.hints = bus
        self.up = up
        self.cfg = cfg
        self.nonces: dict[str, str] = {}  # workspace id -> its row's access_nonce

    @property
    def gw(self) -> gateway.Gateway:
        return self.app[gateway.GATEWAY]

    @property
    def signing(self) -> signing.SigningKeys:
        return self.gw.keys

    def url(self, path: str) -> str:
        return self.base + path

    def cookie(self, workspace_id: str = ECHO_ID, ttl: float = 3600) -> str:
        """A valid cookie of a workspace made by `add` (or `remember`ed); of one that does
        not exist, a cookie signed right but with a nonce no row has."""
        nonce = self.nonces.get(workspace_id, NO_ROW_NONCE)
        value = signing.mint_cookie(self.signing, workspace_id, nonce, ttl,
                                    self.gw.clock.time())
        return f"{self.gw.cookie_name}={value}"

    def remember(self, ws: Workspace) -> Workspace:
        """Note the access nonce of a row a test made itself (for `cookie`)."""
        self.nonces[ws.id] = ws.access_nonce
        return ws

    def headers(self, workspace_id: str = ECHO_ID, **extra: str) -> dict[str, str]:
        return {"Cookie": self.cookie(workspace_id), **extra}

    async def add(self, workspace_id: str = ECHO_ID, status: Status = Status.RUNNING,
                  desired: DesiredState | None = None, now: datetime | None = None,
                  owner: str = "tester", **changes: Any) -> None:
        """A workspace row in `status` (RUNNING rows point at their container by name)."""
        self.remember(await self.store.create(
            id=workspace_id, owner=owner, image_ref=self.up.image,
            desired_state=desired or DesiredState(
                status.value if status.value in DesiredState.__members__ else "RUNNING"),
            now=now))
        if status is not Status.NEW or changes:
            row = await self.store.compare_and_set(
                workspace_id, expect_status=Status.NEW, expect_operation=Operation.NONE,
                status=status, **changes)
            assert row is not None


async def open_stack(database_url: str, up: Upstream, tmp_path: Path,
                     server: ServerConfig | None = None, *, hints: HintBus | None = None,
                     port: int = 0, with_health: bool = False,
                     auth_config: AuthConfig | None = None, clock: Clock | None = None,
                     **gateway_settings: Any) -> AsyncIterator[Stack]:
    """The gateway and the admin API (which mints the access links), mounted as app.py
    does. `hints`: the bus (default: a new in-process one); `port`: 0 for any free one;
    `auth_config`: instead of the test signing key and admin token alone; `clock`: the
    gateway's (default the system's; a FakeClock moves cookie and session time by hand).
    A second stack on the same database and a shared Redis bus is a second replica."""
    cfg = make_config(tmp_path, server, auth_config, **gateway_settings)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=5)
    assert pool is not None
    async with pool.acquire() as conn:
        await migrate(conn)
    docker = aiodocker.Docker(url=up.docker_url)
    ctrl = controller(up, docker)
    bus = hints or InProcessHintBus()
    store = Store(pool)
    app = web.Application()
    app[keys.CONFIG] = cfg
    app[keys.STORE] = store
    app[keys.HINTS] = bus
    app[keys.INSTANCES] = ctrl
    api.setup(app)
    if with_health:  # /healthz and /readyz as app.py mounts them
        app[keys.POOL] = pool
        health.setup(app)
    gateway.setup(app, instances=keys.INSTANCES, clock=clock)
    # handler_cancellation as `codehub serve` runs it: a client that goes away cancels its
    # handler, so a proxied request waiting on the workspace does not outlive its client.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Stack(app, f"http://127.0.0.1:{port}", store, bus, up, cfg)
    finally:
        await runner.cleanup()
        await ctrl.close()
        await docker.close()
        await pool.close()


@pytest.fixture
async def stack(database_url: str, echo_upstream: Upstream, tmp_path: Path,
                ) -> AsyncIterator[Stack]:
    async for s in open_stack(database_url, echo_upstream, tmp_path):
        yield s


@pytest.fixture
async def hosted(database_url: str, echo_upstream: Upstream, tmp_path: Path,
                 ) -> AsyncIterator[Stack]:
    """The gateway in host mode: each workspace at http://{id}.ws.localhost:<port>/ (Chromium
    and aiohttp's resolver take *.localhost for loopback)."""
    port = services.free_port()
    async for s in open_stack(
            database_url, echo_upstream, tmp_path, port=port,
            server=ServerConfig(public_url=f"http://localhost:{port}"),
            workspace_host=f"{{id}}.ws.localhost:{port}"):
        yield s


def client(**kwargs: Any) -> aiohttp.ClientSession:
    """A test client that sends exactly what a test says: no cookie jar, no decompression."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
                                 **kwargs)


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


__all__ = ["ECHO_ID", "Stack", "Upstream", "client", "echo_upstream", "hosted", "open_stack",
           "stack", "start_workspace_container", "wait_for"]
