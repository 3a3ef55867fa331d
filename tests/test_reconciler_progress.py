"""Progress reaches the row through the reconciler's throttle, the one there is
(codehub/reconciler/reconciler.py): at most one write per `progress_write_interval` on the
injected clock, however often the storage adapter reports.

The adapters are the real Docker ones; the storage is wrapped by a double whose archive
reports a burst of steps at one instant, and another burst once the FakeClock moved on,
before it archives for real.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from harness.services import DockerEngine
from reconciler_stack import Stack, make_stack

from codehub.hints import InProcessHintBus
from codehub.interfaces import ArchiveInfo, Progress, ProgressCallback, StorageProvider
from codehub.model import DesiredState, Status
from codehub.reconciler.reconciler import Policy

BURST = 50


class ChattyArchive:
    """`archive` reports BURST steps of phase "testing", waits for `go`, reports BURST more,
    then archives with the real storage."""

    def __init__(self, real: StorageProvider) -> None:
        self.real = real
        self.first_burst = asyncio.Event()
        self.go = asyncio.Event()

    async def archive(self, workspace_id: str, home_store_key: str,
                      progress: ProgressCallback | None = None) -> ArchiveInfo:
        assert progress is not None
        for done in range(2 * BURST):
            if done == BURST:
                self.first_burst.set()
                await self.go.wait()
            result = progress(Progress("testing", done, 2 * BURST))
            if result is not None:
                await result
        return await self.real.archive(workspace_id, home_store_key, progress)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture
async def stack(database_url: str, s3_settings: dict[str, str],
                docker_engine: DockerEngine, workspace_image: str,
                docker_prefix: str) -> AsyncIterator[Stack]:
    async with make_stack(database_url=database_url, hints=InProcessHintBus(),
                          s3_settings=s3_settings, docker_url=docker_engine.url,
                          image=workspace_image, prefix=docker_prefix,
                          policy=Policy(progress_write_interval=1.0)) as s:
        yield s


async def test_progress_is_written_at_most_once_per_interval_however_often_it_is_reported(
        stack: Stack) -> None:
    chatty = ChattyArchive(stack.storage)
    stack.storage = chatty  # type: ignore[assignment]
    written: list[int] = []
    real_cas = stack.store.compare_and_set

    async def spy(workspace_id: str, **changes: Any) -> Any:
        if changes.get("progress_phase") == "testing":
            written.append(changes["progress_done"])
        return await real_cas(workspace_id, **changes)

    stack.store.compare_and_set = spy  # type: ignore[method-assign]
    stack.run_controller()
    await stack.create("chatty", desired_state=DesiredState.WARM)
    await stack.wait_status("chatty", Status.WARM)
    await stack.want("chatty", DesiredState.COLD)
    async with asyncio.timeout(60):
        await chatty.first_burst.wait()
    assert written == [0]  # the first report of the burst, none of the other 49
    ws = await stack.store.get("chatty")
    assert ws is not None and (ws.progress_phase, ws.progress_done) == ("testing", 0)

    await stack.clock.advance(1.5)  # past the interval: the next report is written
    chatty.go.set()
    await stack.wait_status("chatty", Status.COLD)
    assert written == [0, BURST]
