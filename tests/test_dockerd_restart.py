"""A Docker engine restart (live-restore off: every container dies with it) is healed by
the reconciler alone: the workspace comes back RUNNING, with its home, and nobody has to
touch it.

The engine is a private dockerd of this test (its own socket, data root and containerd),
because restarting the shared engine would pull the floor from under every other test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from harness import services
from reconciler_stack import Stack, make_stack

from codehub.clock import SystemClock
from codehub.hints import InProcessHintBus
from codehub.model import Status


@pytest.fixture(scope="module")
def private_dockerd(docker_engine: services.DockerEngine,
                    workspace_image: str) -> Iterator[services.PrivateDockerd]:
    engine = services.PrivateDockerd()
    try:
        engine.start()
        engine.load_image(workspace_image, docker_engine.url)
        yield engine
    finally:
        engine.close()


@pytest.fixture
async def stack_on_private(database_url: str, s3_settings: dict[str, str],
                           private_dockerd: services.PrivateDockerd, workspace_image: str,
                           docker_prefix: str) -> AsyncIterator[Stack]:
    async with make_stack(database_url=database_url, hints=InProcessHintBus(),
                          s3_settings=s3_settings, docker_url=private_dockerd.url,
                          image=workspace_image, prefix=docker_prefix) as s:
        yield s


async def answers(stack: Stack, wid: str) -> bool:
    try:
        up = await stack.instances.resolve_upstream(wid)
        async with aiohttp.ClientSession() as http, http.get(
                f"http://{up.host}:{up.port}/", timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status == 200
    except Exception:
        return False


async def test_workspace_comes_back_running_after_dockerd_restart(
        stack_on_private: Stack, private_dockerd: services.PrivateDockerd) -> None:
    stack = stack_on_private
    stack.clock = SystemClock()  # type: ignore[assignment]  # real time: "by itself"
    stack.run_controller()
    await stack.create("alpha")
    await stack.wait_status("alpha", Status.RUNNING, timeout=120)
    await stack.exec("alpha", "open('/home/coder/kept.txt', 'w').write('still here')")
    assert await answers(stack, "alpha")

    began = time.monotonic()
    await asyncio.to_thread(private_dockerd.stop)
    stopped = time.monotonic()
    await asyncio.sleep(3)  # the reconciler's resync finds no engine meanwhile
    await asyncio.to_thread(private_dockerd.start)
    restarted = time.monotonic()

    deadline = time.monotonic() + 60
    while not await answers(stack, "alpha"):
        if time.monotonic() > deadline:
            row = await stack.store.get("alpha")
            observed = await stack.instances.get_status("alpha")
            raise AssertionError(f"not answering 60 s after the restart: {row}, {observed}")
        await asyncio.sleep(0.5)
    back = time.monotonic()
    ws = await stack.wait_status("alpha", Status.RUNNING, timeout=30)
    assert ws.error_count == 0, ws.error_message
    assert await stack.exec("alpha", "print(open('/home/coder/kept.txt').read(), end='')") \
        == "still here"
    print(f"dockerd stop {stopped - began:.1f} s, down {restarted - stopped:.1f} s, "
          f"workspace answering {back - restarted:.1f} s after the engine")
