"""Failures are recorded, retried with backoff, and end in ERROR only when they should;
an action's progress is a sign of life, written to the row through the reconciler's one
throttle (at most once per `progress_write_interval` on the clock).

The adapters are the real Docker ones, wrapped by doubles that inject faults (JupyterHub's
BadSpawner/NeverSpawner pattern); time is a FakeClock, so backoff is crossed without sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from apitools import auth, make_app
from harness.services import DockerEngine
from reconciler_stack import Stack, make_stack

from codehub import keys
from codehub.hints import InProcessHintBus
from codehub.interfaces import (
    ArchiveInfo,
    PermanentError,
    Progress,
    ProgressCallback,
    StorageProvider,
)
from codehub.model import DesiredState, Operation, Status
from codehub.reconciler.controller import Controller
from codehub.reconciler.reconciler import Policy, Result


class FlakyProvision:
    """Fails `provision` `failures` times, then behaves as the real storage."""

    def __init__(self, real: StorageProvider, failures: int,
                 exc: type[Exception] = RuntimeError) -> None:
        self.real = real
        self.failures = failures
        self.exc = exc
        self.calls = 0

    async def provision(self, workspace_id: str, *args: Any, **kwargs: Any) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc(f"injected failure {self.calls}")
        return await self.real.provision(workspace_id, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class NeverProvision(FlakyProvision):
    """`provision` hangs forever without reporting progress."""

    async def provision(self, workspace_id: str, *args: Any, **kwargs: Any) -> str:
        self.calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


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
                          policy=Policy(max_failures=4, backoff_base=10, backoff_max=40,
                                        stuck_timeout=60)) as s:
        yield s


async def until(cond: Any, timeout: float = 20) -> Any:
    async with asyncio.timeout(timeout):
        while not (value := await cond()):
            await asyncio.sleep(0.05)
    return value


async def test_failure_is_recorded_and_retried_with_backoff_until_it_succeeds(
        stack: Stack) -> None:
    flaky = FlakyProvision(stack.storage, failures=2)
    stack.storage = flaky  # type: ignore[assignment]
    looked = reconciles(stack.run_controller())
    await stack.create("flaky", desired_state=DesiredState.WARM)
    ws = await until(lambda: _row_with(stack, "flaky", error_count=1))
    assert ws.operation is Operation.PROVISIONING  # kept: the retry resumes it
    assert "injected failure 1" in ws.error_message
    # The backoff counts from the failure's own time (error_at): the fake clock may have
    # been advanced past it while the failure was being recorded.
    assert (ws.next_retry_at - ws.error_at).total_seconds() == pytest.approx(10, abs=1)
    # Nothing happens before the backoff ran out: the reconciler is made to look at the
    # row again (a hint) and seen to decline, 9 s into the 10 s backoff.
    await stack.clock.advance(9)
    await looked_again(stack, looked, "flaky")
    assert flaky.calls == 1
    await stack.clock.advance(10)
    ws = await until(lambda: _row_with(stack, "flaky", error_count=2))
    assert (ws.next_retry_at - ws.error_at).total_seconds() == pytest.approx(20, abs=1)
    await stack.clock.advance(20)
    ws = await stack.wait_status("flaky", Status.WARM)
    assert ws.error_count == 0 and ws.error_message is None and ws.next_retry_at is None
    assert flaky.calls == 3


async def test_max_failures_put_the_workspace_in_error_until_an_admin_acts(
        stack: Stack) -> None:
    flaky = FlakyProvision(stack.storage, failures=100)
    stack.storage = flaky  # type: ignore[assignment]
    looked = reconciles(stack.run_controller())
    await stack.create("doomed", desired_state=DesiredState.WARM)
    ws = await until(lambda: _stepping(stack, "doomed", status=Status.ERROR))
    assert ws.error_count == 4 and ws.error_from_status is Status.NEW
    assert ws.operation is Operation.PROVISIONING  # what failed stays recorded
    calls = flaky.calls
    await stack.clock.advance(3600)
    await looked_again(stack, looked, "doomed")  # the reconciler saw it, an hour later
    assert flaky.calls == calls  # no more retries


async def test_backoff_doubles_up_to_its_cap(
        database_url: str, s3_settings: dict[str, str], docker_engine: DockerEngine,
        workspace_image: str, docker_prefix: str) -> None:
    async with make_stack(database_url=database_url, hints=InProcessHintBus(),
                          s3_settings=s3_settings, docker_url=docker_engine.url,
                          image=workspace_image, prefix=docker_prefix,
                          policy=Policy(max_failures=8, backoff_base=10, backoff_max=25,
                                        stuck_timeout=60)) as stack:
        flaky = FlakyProvision(stack.storage, failures=5)
        stack.storage = flaky  # type: ignore[assignment]
        stack.run_controller()
        await stack.create("capped", desired_state=DesiredState.WARM)
        delays = []
        for failure in range(1, 6):
            ws = await until(lambda n=failure: _row_with(stack, "capped", error_count=n))
            delays.append(round((ws.next_retry_at - ws.error_at).total_seconds()))
            await stack.clock.advance(25)
        assert delays == [10, 20, 25, 25, 25]
        ws = await stack.wait_status("capped", Status.WARM)
        assert flaky.calls == 6 and ws.error_count == 0


async def test_retry_through_the_api_resumes_the_failed_operation(
        stack: Stack, database_url: str, aiohttp_client: Any) -> None:
    flaky = FlakyProvision(stack.storage, failures=4)  # exactly max_failures
    stack.storage = flaky  # type: ignore[assignment]
    stack.run_controller()
    await stack.create("again", desired_state=DesiredState.WARM)
    ws = await until(lambda: _stepping(stack, "again", status=Status.ERROR))
    assert ws.operation is Operation.PROVISIONING and flaky.calls == 4
    app = await make_app(database_url)
    app[keys.HINTS] = stack.hints  # the API's hints reach this reconciler
    api = await aiohttp_client(app)
    resp = await api.post("/api/v1/workspaces/again/retry", headers=auth())
    assert resp.status == 202, await resp.text()
    ws = await stack.wait_status("again", Status.WARM)
    assert flaky.calls == 5  # the recorded PROVISIONING ran once more, and succeeded
    assert ws.error_count == 0 and ws.error_message is None and ws.home_store_key


async def test_non_retryable_failure_goes_to_error_at_once(stack: Stack) -> None:
    stack.storage = FlakyProvision(stack.storage, failures=100,  # type: ignore[assignment]
                                   exc=PermanentError)
    stack.run_controller()
    await stack.create("bad-image", desired_state=DesiredState.WARM)
    ws = await until(lambda: _row_with(stack, "bad-image", status=Status.ERROR))
    assert ws.error_count == 1


async def test_deleting_a_workspace_in_error_still_works(stack: Stack) -> None:
    stack.storage = FlakyProvision(stack.storage, failures=100,  # type: ignore[assignment]
                                   exc=PermanentError)
    stack.run_controller()
    await stack.create("err", desired_state=DesiredState.WARM)
    await until(lambda: _row_with(stack, "err", status=Status.ERROR))
    await stack.want("err", DesiredState.DELETED)
    await stack.wait_gone("err")


async def test_stuck_operation_is_cancelled_and_retried_never_left_hanging(
        stack: Stack) -> None:
    never = NeverProvision(stack.storage, failures=0)
    stack.storage = never  # type: ignore[assignment]
    stack.run_controller()
    await stack.create("stuck", desired_state=DesiredState.WARM)
    await until(lambda: _op_started(stack, "stuck"))
    await stack.clock.advance(61)  # no progress for longer than stuck_timeout
    ws = await until(lambda: _row_with(stack, "stuck", error_count=1))
    assert "no progress for 60s" in ws.error_message
    await stack.clock.advance(10)
    await until(lambda: _calls(never, 2))  # retried


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


def reconciles(controller: Controller) -> list[tuple[str, float]]:
    """Every reconcile() the controller's workers complete from now on: (id, the clock's
    time when it started). A spy around the real reconciler; nothing is changed."""
    seen: list[tuple[str, float]] = []
    real = controller.reconciler.reconcile
    clock = controller.reconciler.clock

    async def spy(workspace_id: str) -> Result:
        started = clock.monotonic()
        result = await real(workspace_id)
        seen.append((workspace_id, started))
        return result

    controller.reconciler.reconcile = spy  # type: ignore[method-assign]
    return seen


async def looked_again(stack: Stack, seen: list[tuple[str, float]], wid: str) -> None:
    """Hint `wid` and wait until a reconcile of it that started at the clock's present time
    has completed: whatever it decided, it had the chance to act."""
    now = stack.clock.monotonic()
    await stack.hints.publish(wid)
    async with asyncio.timeout(20):
        while not any(w == wid and t >= now for w, t in seen):
            await asyncio.sleep(0.01)


async def _row_with(stack: Stack, wid: str, **want: Any) -> Any:
    ws = await stack.store.get(wid)
    if ws is not None and all(getattr(ws, k) == v for k, v in want.items()):
        return ws
    return None


async def _stepping(stack: Stack, wid: str, **want: Any) -> Any:
    """Like _row_with, moving the clock past the longest backoff on every miss."""
    ws = await _row_with(stack, wid, **want)
    if ws is None:
        await stack.clock.advance(40)
    return ws


async def _op_started(stack: Stack, wid: str) -> bool:
    ws = await stack.store.get(wid)
    return ws is not None and ws.operation is Operation.PROVISIONING


async def _calls(double: FlakyProvision, n: int) -> bool:
    return double.calls >= n
