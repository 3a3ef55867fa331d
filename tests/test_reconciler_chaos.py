"""Crash safety: `codehub serve` is SIGKILLed at every failpoint and at random moments;
a fresh process converges, no home data is lost, nothing is left behind.

Each case walks one workspace through the whole tour NEW -> RUNNING (home written) ->
WARM -> COLD -> WARM (restore) -> RUNNING (home compared) -> DELETED with a real
`codehub serve` child as the leader, on real PostgreSQL, Redis, Docker and moto S3.
The first child has one failpoint armed (CODEHUB_FAILPOINT) or is killed after a random
delay; every later child runs clean. Every case asserts that the child really died by
SIGKILL exactly once.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest
from harness.services import DockerEngine
from reconciler_stack import Leader, Stack, leader_env

from codehub.model import DesiredState, Status

FAILPOINTS = [
    # reconcile: after the operation was recorded, before acting
    "reconcile.provision.recorded", "reconcile.start.recorded", "reconcile.stop.recorded",
    "reconcile.archive.recorded", "reconcile.restore.recorded", "reconcile.delete.recorded",
    # archive (storage) and its commit
    "archive.after_stream_start", "archive.after_upload", "archive.after_verify",
    "reconcile.archive.committed", "delete_volume.before_delete",
    "reconcile.archive.volume_deleted",
    # restore (storage) and its commit
    "restore.after_download_start", "restore.after_extract", "restore.before_return",
    "reconcile.restore.returned",
    # delete
    "reconcile.delete.purged",
]
RANDOM_KILLS = int(os.environ.get("CODEHUB_CHAOS_RANDOM_KILLS", "4"))
SEED = int(os.environ.get("CODEHUB_CHAOS_SEED", str(random.randrange(1 << 30))))


async def converge(stack: Stack, leader: Leader, wid: str, status: Status | None,
                   timeout: float = 60) -> None:
    """Wait for the row to settle at `status` (None: the row is gone), restarting a
    killed leader; the 60 s start again after every restart."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    kills = leader.kills
    while True:
        leader.check()
        if leader.kills != kills:
            kills = leader.kills
            deadline = loop.time() + timeout  # a fresh process gets its own 60 s
        ws = await stack.store.get(wid)
        if status is None and ws is None:
            return
        if ws is not None and ws.status is status and ws.operation.value == "NONE":
            return
        assert ws is None or ws.status is not Status.ERROR, (ws.error_message, ws)
        assert loop.time() < deadline, (
            f"not converged to {status} in {timeout}s: {ws}\n{leader.tail()}")
        await asyncio.sleep(0.1)


async def tour(stack: Stack, leader: Leader, wid: str,
               random_kill: random.Random | None = None) -> None:
    async def want(desired: DesiredState, status: Status | None, last: bool = False) -> None:
        await stack.want(wid, desired)
        # Each step is killed with probability 1/2 until one is; the last step surely is,
        # so that no case quietly becomes a plain lifecycle test.
        if random_kill is not None and leader.kills == 0 and (
                last or random_kill.random() < 0.5):
            await asyncio.sleep(random_kill.uniform(0.05, 2.0))
            leader.kill()
        await converge(stack, leader, wid, status)

    await stack.create(wid, desired_state=DesiredState.WARM)
    await converge(stack, leader, wid, Status.WARM)
    await want(DesiredState.RUNNING, Status.RUNNING)
    await stack.write_home(wid)
    before = await stack.manifest(wid)
    await want(DesiredState.WARM, Status.WARM)
    await want(DesiredState.COLD, Status.COLD)
    left = await stack.leftovers()
    assert left["volumes"] == [] and left["archives"] == [f"{wid}/home.tar.gz"], left
    await want(DesiredState.WARM, Status.WARM)
    await want(DesiredState.RUNNING, Status.RUNNING)
    assert await stack.manifest(wid) == before, "home data changed across the crash"
    await want(DesiredState.DELETED, None, last=True)
    assert await stack.leftovers() == {"containers": [], "volumes": [], "archives": []}


@pytest.mark.parametrize("failpoint", FAILPOINTS)
async def test_killed_at_failpoint_a_fresh_leader_converges_without_loss(
        stack: Stack, failpoint: str, database_url: str, redis_url: str,
        s3_settings: dict[str, str], docker_engine: DockerEngine, tmp_path: Path) -> None:
    env = leader_env(stack, database_url=database_url, redis_url=redis_url, s3=s3_settings,
                     docker_url=docker_engine.url, data_dir=tmp_path / "data")
    leader = Leader(env, tmp_path / "leader.log")
    leader.start(failpoint)
    try:
        await tour(stack, leader, "chaos")
    finally:
        leader.stop()
    assert leader.kills == 1, f"failpoint {failpoint} never fired"


@pytest.mark.parametrize("case", range(RANDOM_KILLS))
async def test_killed_at_a_random_moment_a_fresh_leader_converges_without_loss(
        stack: Stack, case: int, database_url: str, redis_url: str,
        s3_settings: dict[str, str], docker_engine: DockerEngine, tmp_path: Path) -> None:
    rng = random.Random(SEED + case)
    print(f"chaos seed {SEED + case} (CODEHUB_CHAOS_SEED={SEED} replays this run)")
    env = leader_env(stack, database_url=database_url, redis_url=redis_url, s3=s3_settings,
                     docker_url=docker_engine.url, data_dir=tmp_path / "data")
    leader = Leader(env, tmp_path / "leader.log")
    leader.start()
    try:
        await tour(stack, leader, "chaos", random_kill=rng)
    finally:
        leader.stop()
    assert leader.kills == 1, "the leader was never killed"
