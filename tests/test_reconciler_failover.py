"""Two real `codehub serve` replicas on one PostgreSQL: one leader, fast failover, and never
two processes acting on one workspace (checked from the actions' own event log)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson
from harness.services import DockerEngine
from reconciler_stack import Leader, Stack, leader_env

from codehub.model import DesiredState, Status

# Seconds the standby may take to lead after the leader is SIGKILLed: generous (the goal is
# 5 s; it measures about one leader_check_interval), the figure itself is printed.
FAILOVER_BOUND = 60.0


async def is_leader(http: aiohttp.ClientSession, port: int) -> bool | None:
    try:
        async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
            if resp.status != 200:
                return None
            return bool((await resp.json())["leader"])
    except aiohttp.ClientError:
        return None


async def the_one_leader(http: aiohttp.ClientSession, ports: list[int]) -> int:
    """Wait until every replica is ready and exactly one leads; check it stays so."""
    async with asyncio.timeout(60):
        while True:
            flags = [await is_leader(http, port) for port in ports]
            if None not in flags and flags.count(True) == 1:
                break
            await asyncio.sleep(0.1)
    for _ in range(20):
        flags = [await is_leader(http, port) for port in ports]
        assert flags.count(True) == 1, flags
        await asyncio.sleep(0.1)
    return flags.index(True)


def in_flight(path: Path) -> bool:
    """An action has begun and not ended (by the event log)."""
    if not path.exists():
        return False
    open_ = set()
    for line in path.read_bytes().splitlines():
        e = orjson.loads(line)
        key = (e["workspace"], e["step"])
        if e["phase"] == "begin":
            open_.add(key)
        else:
            open_.discard(key)
    return bool(open_)


def assert_never_two_actors(events: list[dict[str, str]], killed: dict[int, datetime]) -> int:
    """Per workspace, an action of one pid never begins while another pid's is open.
    A killed process's open action ends when it was killed. Returns actions checked."""
    open_by: dict[str, tuple[int, datetime]] = {}
    checked = 0
    for e in sorted(events, key=lambda e: e["t"]):
        t = datetime.fromisoformat(e["t"])
        ws, pid = e["workspace"], int(e["pid"])
        if e["phase"] == "begin":
            holder = open_by.get(ws)
            if holder is not None and holder[0] != pid:
                died = killed.get(holder[0])
                assert died is not None and died <= t, (
                    f"pid {pid} began {e['step']} on {ws} at {t} while pid {holder[0]} "
                    f"acted since {holder[1]}")
            open_by[ws] = (pid, t)
            checked += 1
        else:
            open_by.pop(ws, None)
    return checked


async def test_a_killed_leader_is_replaced_and_never_two_act_on_a_workspace(
        stack: Stack, database_url: str, redis_url: str, s3_settings: dict[str, str],
        docker_engine: DockerEngine, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    replicas = []
    for name in ("a", "b"):
        env = leader_env(stack, database_url=database_url, redis_url=redis_url,
                         s3=s3_settings, docker_url=docker_engine.url,
                         data_dir=tmp_path / f"data-{name}")
        env["CODEHUB_RECONCILER__EVENT_LOG"] = str(events)
        env["CODEHUB_RECONCILER__LEADER_CHECK_INTERVAL"] = "1"
        replicas.append((Leader(env, tmp_path / f"{name}.log"),
                         int(env["CODEHUB_SERVER__PORT"])))
    for leader, _ in replicas:
        leader.start()
    killed: dict[int, datetime] = {}
    try:
        async with aiohttp.ClientSession() as http:
            first = await the_one_leader(http, [port for _, port in replicas])
            old = replicas[first][0]
            new_port = replicas[1 - first][1]

            ids = [f"fo{i}" for i in range(4)]
            for wid in ids:
                await stack.create(wid)
            async with asyncio.timeout(60):  # wait until the leader is mid-action
                while not in_flight(events):
                    await asyncio.sleep(0.01)
            assert old.proc is not None
            old.proc.kill()
            old.proc.wait()
            killed[old.proc.pid] = datetime.now(UTC)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            # The standby tries the lock every leader_check_interval (1 s); PostgreSQL frees
            # it when the killed backend's connection ends. The figure is reported; the
            # bound is only generous enough that a loaded 2-core machine never hits it (the
            # 5 s goal is measured, not asserted, here).
            async with asyncio.timeout(FAILOVER_BOUND):
                while await is_leader(http, new_port) is not True:
                    await asyncio.sleep(0.05)
            failover = loop.time() - t0
            print(f"failover took {failover:.2f}s (goal 5 s, bound {FAILOVER_BOUND:.0f} s)")

        for wid in ids:  # the new leader finishes the in-flight work
            await stack.wait_status(wid, Status.RUNNING, timeout=60)
        for wid in ids:
            await stack.want(wid, DesiredState.DELETED)
        for wid in ids:
            await stack.wait_gone(wid)
    finally:
        for leader, _ in replicas:
            leader.stop()
    lines = [orjson.loads(line) for line in events.read_bytes().splitlines()]
    pids = {e["pid"] for e in lines}
    assert len(pids) == 2, "both replicas should have acted (before and after failover)"
    assert assert_never_two_actors(lines, killed) >= 8
