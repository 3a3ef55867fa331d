"""Serving through outages of the database and of Redis, against the real services.

Each scenario runs a real gateway (with the admin API mounted, as app.py does) in front
of a RUNNING echo workspace, on a PostgreSQL and a Redis of this module's own (never the
shared session servers: they are frozen and stopped here). While the fault lasts
(`OUTAGE` seconds, 60 as in the acceptance list) one client requests the workspace through
the gateway every ~100 ms and another calls the admin API every ~500 ms.

Figures (requests served, latencies, recovery time) are printed; run with `-s` to see them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from gateway_support import ECHO_ID, Stack, Upstream, client, open_stack, wait_for
from harness import services

from codehub.hints import RedisHintBus
from codehub.model import Status

OUTAGE = float(os.environ.get("CODEHUB_TEST_OUTAGE_SECONDS", "60"))
API_BOUND = 2.0  # seconds: the API's 503 during a database outage
ROUTE_TTL = 2.0  # short, so routes expire (and are re-read) many times during an outage
ADMIN = {"Authorization": "Bearer test-admin-token"}


@pytest.fixture(scope="module")
def private_pg() -> Iterator[services.PostgresServer]:
    if os.environ.get("CODEHUB_TEST_DATABASE_URL"):
        pytest.skip("needs a PostgreSQL of its own to freeze and stop (unset "
                    "CODEHUB_TEST_DATABASE_URL)")
    server = services.start_postgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def private_redis() -> Iterator[services.RedisServer]:
    if os.environ.get("CODEHUB_TEST_REDIS_URL"):
        pytest.skip("needs a Redis of its own to stop (unset CODEHUB_TEST_REDIS_URL)")
    server = services.start_redis()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def private_db(private_pg: services.PostgresServer) -> Iterator[str]:
    with services.fresh_database(private_pg.dsn) as dsn:
        yield dsn


@dataclass
class Tally:
    """What the two clients saw."""

    ws: list[tuple[float, int, float]] = field(default_factory=list)  # (at, status, secs)
    api: list[tuple[float, int, float, str]] = field(default_factory=list)  # + Retry-After
    errors: list[str] = field(default_factory=list)

    def ws_between(self, t0: float, t1: float) -> list[tuple[float, int, float]]:
        return [r for r in self.ws if t0 <= r[0] < t1]

    def api_between(self, t0: float, t1: float) -> list[tuple[float, int, float, str]]:
        return [r for r in self.api if t0 <= r[0] < t1]


async def _loop(every: float, call: Callable[[], Awaitable[None]],
                stop: asyncio.Event) -> None:
    while not stop.is_set():
        began = time.monotonic()
        await call()
        await asyncio.sleep(max(0.0, every - (time.monotonic() - began)))


class Clients:
    """The two clients, running until `stop()`."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.tally = Tally()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session = client()

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(_loop(0.1, self._workspace, self._stop)),
                       asyncio.create_task(_loop(0.5, self._api, self._stop))]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def _workspace(self) -> None:
        t0 = time.monotonic()
        try:
            async with self._session.get(self.stack.url(f"/w/{ECHO_ID}/fault"),
                                         headers=self.stack.headers(),
                                         timeout=aiohttp.ClientTimeout(total=5)) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.tally.errors.append(f"workspace: {type(exc).__name__} {exc}")
            status = 0
        self.tally.ws.append((t0, status, time.monotonic() - t0))

    async def _api(self) -> None:
        t0 = time.monotonic()
        retry = ""
        try:
            async with self._session.get(self.stack.url(f"/api/v1/workspaces/{ECHO_ID}"),
                                         headers=ADMIN,
                                         timeout=aiohttp.ClientTimeout(total=5)) as resp:
                body = await resp.read()
                status = resp.status
                retry = resp.headers.get("Retry-After", "")
                if status == 503:
                    assert resp.content_type == "application/json", body
                    assert b"unavailable" in body, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.tally.errors.append(f"api: {type(exc).__name__} {exc}")
            status = 0
        self.tally.api.append((t0, status, time.monotonic() - t0, retry))


async def _status(url: str, headers: dict[str, str] | None = None) -> int:
    async with client() as s, s.get(url, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=5)) as resp:
        await resp.read()
        return resp.status


@pytest.fixture
async def faulty(private_db: str, echo_upstream: Upstream, tmp_path: Path,
                 ) -> AsyncIterator[Stack]:
    async for s in open_stack(private_db, echo_upstream, tmp_path,
                              with_health=True, route_ttl=ROUTE_TTL):
        await s.add(ECHO_ID, Status.RUNNING)
        yield s


async def _database_outage(stack: Stack, fault: Callable[[], None],
                           heal: Callable[[], None], what: str) -> None:
    assert await _status(stack.url(f"/w/{ECHO_ID}/"), stack.headers()) == 200
    assert await _status(stack.url(f"/api/v1/workspaces/{ECHO_ID}"), ADMIN) == 200
    clients = Clients(stack)
    await clients.start()
    await asyncio.sleep(1)
    t_fault = time.monotonic()
    await asyncio.to_thread(fault)
    try:
        # readiness follows the database; liveness does not
        await asyncio.sleep(3)
        assert await _status(stack.url("/readyz")) == 503
        assert await _status(stack.url("/healthz")) == 200
        # a workspace the gateway has never seen cannot be looked up: 503, not a hang
        t0 = time.monotonic()
        async with client() as s, s.get(stack.url("/w/unknown/"),
                                        headers=stack.headers("unknown")) as resp:
            assert resp.status == 503
            assert resp.headers.get("Retry-After")
        assert time.monotonic() - t0 < API_BOUND + 0.5
        await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - t_fault)))
    finally:
        t_heal = time.monotonic()
        await asyncio.to_thread(heal)
    # recovery without a restart: the API answers 200 again by itself
    t_back = time.monotonic()
    while await _status(stack.url(f"/api/v1/workspaces/{ECHO_ID}"), ADMIN) != 200:
        assert time.monotonic() - t_back < 20, "API did not recover"
        await asyncio.sleep(0.1)
    recovered = time.monotonic() - t_heal
    await asyncio.sleep(1)
    await clients.stop()
    assert await _status(stack.url("/readyz")) == 200
    tally = clients.tally
    during = tally.ws_between(t_fault, t_heal)
    # calls that began once the fault had bitten and ended before the database returned
    api_during = [r for r in tally.api_between(t_fault + API_BOUND, t_heal)
                  if r[0] + r[2] < t_heal]
    print(f"\n[{what}] {OUTAGE:.0f}s: workspace requests during the outage {len(during)}, "
          f"ok {sum(1 for r in during if r[1] == 200)}, max latency "
          f"{max(r[2] for r in during) * 1000:.1f} ms (whole run: {len(tally.ws)} requests, "
          f"max {max(r[2] for r in tally.ws) * 1000:.1f} ms); API calls during the outage "
          f"{len(api_during)}, 503 {sum(1 for r in api_during if r[1] == 503)}, max latency "
          f"{max(r[2] for r in api_during) * 1000:.0f} ms; API 200 again "
          f"{recovered:.2f} s after the database returned; stale routes served "
          f"{stack.gw.routes._stale_served}")
    assert not tally.errors, tally.errors[:5]
    assert len(during) >= OUTAGE * 5  # the client kept going at ~10/s
    assert all(r[1] == 200 for r in tally.ws), [r for r in tally.ws if r[1] != 200][:5]
    assert api_during and all(r[1] == 503 and r[3] for r in api_during), api_during[:5]
    assert all(r[2] < API_BOUND for r in tally.api), max(r[2] for r in tally.api)
    assert recovered < 10


async def test_database_frozen_running_workspace_keeps_serving_and_api_answers_503(
        faulty: Stack, private_pg: services.PostgresServer) -> None:
    pids: list[int] = []

    def freeze() -> None:
        # the postmaster first (it forks no more backends once stopped), then every child,
        # again until no new one shows up: a backend forked while the first list was taken
        # would otherwise keep answering
        while new := [pid for pid in private_pg.pids() if pid not in pids]:
            for pid in new:
                os.kill(pid, signal.SIGSTOP)
                pids.append(pid)
        assert len(pids) > 1  # the postmaster and its backends

    def thaw() -> None:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)

    await _database_outage(faulty, freeze, thaw, "PostgreSQL frozen (SIGSTOP)")


async def test_database_stopped_running_workspace_keeps_serving_and_api_answers_503(
        faulty: Stack, private_pg: services.PostgresServer) -> None:
    await _database_outage(faulty, private_pg.stop_server, private_pg.start_server,
                           "PostgreSQL stopped (fast shutdown)")


async def test_redis_stopped_gateway_and_api_keep_working_and_hints_resume(
        private_db: str, echo_upstream: Upstream, tmp_path: Path,
        private_redis: services.RedisServer) -> None:
    bus = RedisHintBus(private_redis.url)
    try:
        async for stack in open_stack(private_db, echo_upstream, tmp_path,
                                      with_health=True, hints=bus, route_ttl=ROUTE_TTL):
            await _redis_outage(stack, private_redis)
    finally:
        await bus.close()


async def _redis_outage(stack: Stack, private_redis: services.RedisServer) -> None:
    await stack.add(ECHO_ID, Status.RUNNING)
    heard: list[tuple[float, str]] = []
    routes = stack.gw.routes
    invalidate = routes.invalidate

    def observed(workspace_id: str) -> None:  # records hints the gateway consumed
        heard.append((time.monotonic(), workspace_id))
        invalidate(workspace_id)

    routes.invalidate = observed  # type: ignore[method-assign]
    await asyncio.sleep(0.5)  # the gateway's subscription is up
    patch = {"warm_ttl_seconds": 600}
    patches: list[float] = []  # seconds each PATCH (which publishes a hint) took

    async def api_patch() -> float:
        """A PATCH that changes the row (an unchanged row publishes no hint)."""
        patch["warm_ttl_seconds"] += 1
        t0 = time.monotonic()
        async with client() as s, s.patch(
                stack.url(f"/api/v1/workspaces/{ECHO_ID}"), json=patch,
                headers=ADMIN, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            assert resp.status in (200, 202), await resp.text()
        patches.append(time.monotonic() - t0)
        return t0

    t0 = await api_patch()
    await wait_for(lambda: any(t >= t0 for t, _ in heard), 5)
    clients = Clients(stack)
    await clients.start()
    t_fault = time.monotonic()
    await asyncio.to_thread(private_redis.stop)
    await asyncio.sleep(3)
    assert await _status(stack.url("/readyz")) == 503
    t0 = await api_patch()  # works; its hint is lost (resync covers it)
    await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - t_fault)))
    t_heal = time.monotonic()
    await asyncio.to_thread(private_redis.start)
    # the gateway resubscribes by itself (backoff capped at a few seconds)
    deadline = time.monotonic() + 15
    while True:
        t0 = await api_patch()
        try:
            await wait_for(lambda t0=t0: any(t >= t0 for t, _ in heard), 1)
            break
        except AssertionError:
            assert time.monotonic() < deadline, "hints did not resume"
    resumed = time.monotonic() - t_heal
    await clients.stop()
    tally = clients.tally
    during = tally.ws_between(t_fault, t_heal)
    api_during = tally.api_between(t_fault, t_heal)
    print(f"\n[Redis stopped] {OUTAGE:.0f}s: workspace requests during the outage "
          f"{len(during)}, max latency {max(r[2] for r in during) * 1000:.1f} ms; "
          f"API calls {len(api_during)}, max latency "
          f"{max(r[2] for r in api_during) * 1000:.0f} ms; hints heard again "
          f"{resumed:.2f} s after Redis returned; PATCH (publishes) max "
          f"{max(patches) * 1000:.0f} ms")
    assert not tally.errors, tally.errors[:5]
    assert all(r[1] == 200 for r in tally.ws), [r for r in tally.ws if r[1] != 200]
    assert all(r[1] == 200 for r in tally.api), [r for r in tally.api if r[1] != 200]
    assert len(during) >= OUTAGE * 5
    assert max(patches) < API_BOUND, patches  # a lost hint does not hold the API up
    assert await _status(stack.url("/readyz")) == 200
