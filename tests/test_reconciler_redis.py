"""Hints are an optimisation: with Redis down convergence goes on through resync, and when
Redis comes back hints flow again without restarting anything."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aioredis
from harness.services import RedisServer
from reconciler_stack import Stack

from codehub import constants
from codehub.model import DesiredState, Status


async def subscribers(url: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        counts = await client.pubsub_numsub(constants.HINT_CHANNEL)
        return int(counts[0][1])
    finally:
        await client.aclose()


async def settled(stack: Stack, wid: str) -> bool:
    ws = await stack.store.get(wid)
    return ws is not None and ws.status is Status.WARM and ws.operation.value == "NONE"


async def test_redis_outage_degrades_to_resync_and_recovers_by_itself(
        stack: Stack, redis_server: RedisServer, redis_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="codehub.hints")
    stack.run_controller()
    async with asyncio.timeout(10):
        while await subscribers(redis_url) != 1:
            await asyncio.sleep(0.05)

    # With Redis up, a hint alone (no resync: the fake clock stands still) does the work.
    await stack.create("hinted", desired_state=DesiredState.WARM)
    await stack.wait_status("hinted", Status.WARM, timeout=30)

    redis_server.stop()
    await stack.create("lost", desired_state=DesiredState.WARM)  # its hint is dropped
    await asyncio.sleep(1.0)
    assert not await settled(stack, "lost")
    # the periodic resync (5 s of clock time) finds it
    await stack.wait_status("lost", Status.WARM, timeout=30,
                            step=lambda: stack.clock.advance(5))

    redis_server.start()  # same URL; nobody restarts anything
    async with asyncio.timeout(20):
        while await subscribers(redis_url) != 1:
            await asyncio.sleep(0.05)
    await stack.create("after", desired_state=DesiredState.WARM)
    await stack.wait_status("after", Status.WARM, timeout=30)  # a hint did it again

    messages = [r.getMessage() for r in caplog.records]
    assert sum("subscription lost" in m for m in messages) == 1, messages
    assert sum("hints are being dropped" in m for m in messages) == 1, messages
    assert sum("subscription restored" in m for m in messages) == 1, messages
