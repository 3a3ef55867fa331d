"""The reconciler's logic on the in-memory backends (codehub.backends.memory), which pass
the same conformance suite as the Docker and S3 adapters (tests/conformance/): the same
lifecycle as test_reconciler_lifecycle.py, in seconds. PostgreSQL stays real (the store's
compare-and-set is part of the logic); hints are in-process; time is a FakeClock.

The real-service versions of these tests stay: they check the adapters under the logic.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from reconciler_stack import Stack

from codehub.backends.memory import (
    MemoryInstanceController,
    MemoryObjectStore,
    MemoryStorageProvider,
)
from codehub.clock import FakeClock
from codehub.hints import InProcessHintBus
from codehub.interfaces import AdapterError, ObjectMeta
from codehub.model import DesiredState, InstanceState, Operation, Status
from codehub.reconciler.controller import Schedule
from codehub.reconciler.reconciler import Policy
from codehub.store import Store

IMAGE = "codehub-test/echo:memory"
HOME = {".bashrc": b"export EDITOR=vi\n", "project/src/main.py": b"print('hello')\n" * 100,
        "big.bin": bytes(range(256)) * 12288}

pytestmark = pytest.mark.timeout(120)


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}


@pytest.fixture
async def memory_stack(database_url: str) -> AsyncIterator[Stack]:
    """A Stack (tests/reconciler_stack.py) whose adapters are the in-memory backends."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=8)
    objects = MemoryObjectStore()
    storage = MemoryStorageProvider(objects)
    stack = Stack(
        pool=pool, store=Store(pool), docker=None,  # type: ignore[arg-type]
        objects=objects,  # type: ignore[arg-type]
        instances=MemoryInstanceController(storage, images={IMAGE}),  # type: ignore[arg-type]
        storage=storage,  # type: ignore[arg-type]
        hints=InProcessHintBus(), clock=FakeClock(start=datetime.now(UTC)), image=IMAGE,
        prefix="memory",
        schedule=Schedule(workers=4, resync_interval=5, ttl_sweep_interval=10,
                          default_warm_ttl=600, default_cold_ttl=3600),
        policy=Policy(max_failures=5, backoff_base=0.5, backoff_max=5, stuck_timeout=120))
    try:
        yield stack
    finally:
        await stack.stop()
        await pool.close()


def parts(stack: Stack) -> tuple[MemoryInstanceController, MemoryStorageProvider,
                                 MemoryObjectStore]:
    instances, storage, objects = stack.instances, stack.storage, stack.objects
    assert isinstance(instances, MemoryInstanceController)
    assert isinstance(storage, MemoryStorageProvider)
    assert isinstance(objects, MemoryObjectStore)
    return instances, storage, objects


def leftovers(stack: Stack) -> dict[str, list[str]]:
    instances, storage, objects = parts(stack)
    return {"containers": sorted(instances.instances), "volumes": sorted(storage.volumes),
            "archives": sorted(objects.objects)}


async def test_workspace_lives_through_every_tier_and_keeps_its_home_in_memory(
        memory_stack: Stack) -> None:
    stack = memory_stack
    _, storage, _ = parts(stack)
    stack.run_controller()
    await stack.create("alpha", warm_ttl_seconds=300, cold_ttl_seconds=900)
    ws = await stack.wait_status("alpha", Status.RUNNING)
    assert ws.home_store_key and ws.observed_generation == ws.generation
    storage.write_files(ws.home_store_key, HOME)

    # idle past warm_ttl: stepped down to WARM, the container gone
    ws = await stack.wait_status("alpha", Status.WARM, step=lambda: stack.clock.advance(60))
    assert (await stack.instances.get_status("alpha")).state is InstanceState.MISSING

    # idle past cold_ttl: archived, the volume deleted only after the archive committed
    ws = await stack.wait_status("alpha", Status.COLD, step=lambda: stack.clock.advance(120))
    assert ws.archive_key == "alpha/home.tar.gz" and ws.archive_sha256 and ws.archive_size
    assert ws.home_store_key is None
    assert leftovers(stack) == {"containers": [], "volumes": [],
                                "archives": ["alpha/home.tar.gz"]}

    # restored (what POST /restore does: desired WARM) into a new volume, then started
    await stack.want("alpha", DesiredState.WARM)
    ws = await stack.wait_status("alpha", Status.WARM)
    assert ws.home_store_key and ws.archive_key
    await stack.want("alpha", DesiredState.RUNNING)
    ws = await stack.wait_status("alpha", Status.RUNNING)
    assert ws.home_store_key is not None
    assert digests(storage.volumes[ws.home_store_key].files) == digests(HOME)

    # deleted: nothing is left anywhere
    await stack.want("alpha", DesiredState.DELETED)
    await stack.wait_gone("alpha")
    assert leftovers(stack) == {"containers": [], "volumes": [], "archives": []}


async def test_container_that_died_behind_our_back_is_started_again_in_memory(
        memory_stack: Stack) -> None:
    stack = memory_stack
    instances, _, _ = parts(stack)
    stack.run_controller()
    await stack.create("beta")
    await stack.wait_status("beta", Status.RUNNING)
    first = instances.instances["beta"].number
    instances.fail("beta", 137)
    async with asyncio.timeout(60):  # the periodic resync observes the drift
        while (await stack.instances.get_status("beta")).state is not InstanceState.RUNNING:
            await stack.clock.advance(5)
            await asyncio.sleep(0.05)
    assert instances.instances["beta"].number != first


async def test_vanished_volume_is_an_error_never_a_blank_home_in_memory(
        memory_stack: Stack) -> None:
    stack = memory_stack
    stack.run_controller()
    await stack.create("gamma", desired_state=DesiredState.WARM)
    ws = await stack.wait_status("gamma", Status.WARM)
    await stack.storage.delete_volume(ws.id, ws.home_store_key)  # the volume disappears
    await stack.want("gamma", DesiredState.RUNNING)
    ws = await stack.wait_status("gamma", Status.ERROR)
    assert ws.error_message and "missing" in ws.error_message
    assert ws.error_from_status is Status.WARM and ws.operation is Operation.NONE
    assert leftovers(stack)["volumes"] == []  # nothing was provisioned over it


async def test_orphans_labelled_as_ours_are_removed_on_election_in_memory(
        memory_stack: Stack) -> None:
    stack = memory_stack
    key = await stack.storage.provision("orphan")
    await stack.instances.start("orphan", IMAGE, key)
    removed = await stack.controller().remove_orphans()
    assert sorted(removed) == sorted(["codehub-ws-orphan", key])
    assert leftovers(stack) == {"containers": [], "volumes": [], "archives": []}


class FailingPuts(MemoryObjectStore):
    """Fault injection: the first `failures` uploads fail midway."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes], *,
                         fmt: str = "tar+gzip") -> ObjectMeta:
        if self.failures > 0:
            self.failures -= 1
            async for _ in chunks:
                raise AdapterError("injected: the store went away mid-upload")
        return await super().put_stream(key, chunks, fmt=fmt)


async def test_a_failed_archive_keeps_the_volume_and_is_retried_in_memory(
        memory_stack: Stack) -> None:
    stack = memory_stack
    _, storage, _ = parts(stack)
    flaky = FailingPuts(failures=2)
    storage.objects = stack.objects = flaky
    stack.run_controller()
    await stack.create("delta", desired_state=DesiredState.WARM)
    ws = await stack.wait_status("delta", Status.WARM)
    assert ws.home_store_key is not None
    storage.write_files(ws.home_store_key, HOME)
    await stack.want("delta", DesiredState.COLD)
    async with asyncio.timeout(30):
        while not ((row := await stack.store.get("delta")) and row.error_count):
            await asyncio.sleep(0.02)
    assert row.status is Status.WARM and row.operation is Operation.ARCHIVING
    assert "injected" in (row.error_message or "")
    assert digests(storage.volumes[ws.home_store_key].files) == digests(HOME)
    assert await flaky.head("delta/home.tar.gz") is None
    ws = await stack.wait_status("delta", Status.COLD, step=lambda: stack.clock.advance(1))
    assert flaky.failures == 0 and ws.home_store_key is None and ws.archive_sha256
    restored = await storage.restore("delta", "delta/home.tar.gz", ws.archive_sha256)
    assert digests(storage.volumes[restored].files) == digests(HOME)


async def test_a_restore_that_does_not_verify_is_an_error_that_keeps_the_archive_in_memory(
        memory_stack: Stack) -> None:
    stack = memory_stack
    _, storage, objects = parts(stack)
    stack.run_controller()
    await stack.create("eps", desired_state=DesiredState.WARM)
    ws = await stack.wait_status("eps", Status.WARM)
    assert ws.home_store_key is not None
    storage.write_files(ws.home_store_key, HOME)
    await stack.want("eps", DesiredState.COLD)
    ws = await stack.wait_status("eps", Status.COLD)
    key = "eps/home.tar.gz"
    damaged = bytearray(objects.objects[key])
    damaged[len(damaged) // 2] ^= 0xFF  # same size: only the checksum can tell
    objects.objects[key] = bytes(damaged)
    await stack.want("eps", DesiredState.WARM)
    async with asyncio.timeout(30):  # an IntegrityError is permanent: ERROR at once
        while not ((row := await stack.store.get("eps")) and row.status is Status.ERROR):
            await asyncio.sleep(0.02)
    assert row.error_message and "does not verify" in row.error_message
    assert row.error_from_status is Status.COLD and row.archive_key == key
    assert row.operation is Operation.RESTORING  # resumed when an admin retries
    assert objects.objects[key] == bytes(damaged) and await objects.head(key) is not None
    assert leftovers(stack)["volumes"] == []  # the half-made volume was removed
