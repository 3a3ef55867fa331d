"""The reconciler drives real workspaces through every tier on real services.

PostgreSQL, Redis (hints), Docker (containers, volumes) and moto S3 are all real; time is
a FakeClock, so TTLs are crossed without sleeping.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from reconciler_stack import Stack

from codehub.model import DesiredState, InstanceState, Operation, Status


def sweeps_done(stack: Stack) -> list[datetime]:
    """The `now` of every warm sweep the controller completes from now on (a spy around the
    real Store.sweep_warm)."""
    done: list[datetime] = []
    real = stack.store.sweep_warm

    async def spy(now: datetime, default_ttl_seconds: int) -> list[str]:
        stepped = await real(now, default_ttl_seconds)
        done.append(now)
        return stepped

    stack.store.sweep_warm = spy  # type: ignore[method-assign]
    return done


async def sweep_at_or_after(stack: Stack, done: list[datetime], when: datetime) -> None:
    """Wait until a sweep that looked at the time `when` (or later) has completed, moving
    the clock on by at most one sweep interval (plus a little) to get it to run."""
    async with asyncio.timeout(30):
        for _ in range(int(stack.schedule.ttl_sweep_interval) + 5):
            for _ in range(20):
                if any(t >= when for t in done):
                    return
                await asyncio.sleep(0.05)
            await stack.clock.advance(1)
    raise AssertionError(f"no sweep at or after {when}: {done[-3:]}")


async def test_workspace_lives_through_every_tier_and_keeps_its_home(stack: Stack) -> None:
    sweeps = sweeps_done(stack)
    stack.run_controller()
    await stack.create("alpha", warm_ttl_seconds=300, cold_ttl_seconds=900)
    ws = await stack.wait_status("alpha", Status.RUNNING)
    assert ws.home_store_key
    # The generation is recorded by the pass that finds nothing left to do (_settle).
    async with asyncio.timeout(30):
        while ws.observed_generation != ws.generation:
            await asyncio.sleep(0.1)
            ws = await stack.wait_status("alpha", Status.RUNNING)
    await stack.write_home("alpha")
    before = await stack.manifest("alpha")
    assert any(e["path"] == "big.bin" and e["size"] == 48 * 65536 for e in before)
    assert any(e["path"] == "link" and e["target"] == "project/src/main.py" for e in before)

    # idle past warm_ttl (300 s): the TTL sweep (every 10 s) steps it down to WARM
    await stack.clock.advance(200)
    await sweep_at_or_after(stack, sweeps, stack.clock.now())  # swept at 200+ s idle: kept
    assert (await stack.store.get("alpha")).desired_state is DesiredState.RUNNING  # type: ignore[union-attr]
    ws = await stack.wait_status("alpha", Status.WARM, step=lambda: stack.clock.advance(10))
    assert (await stack.instances.get_status("alpha")).state.value == "MISSING"

    # idle past cold_ttl (900 s): archived, volume deleted
    ws = await stack.wait_status("alpha", Status.COLD, step=lambda: stack.clock.advance(30))
    assert ws.archive_key == "alpha/home.tar.gz" and ws.archive_sha256 and ws.archive_size
    assert ws.home_store_key is None
    left = await stack.leftovers()
    assert left["containers"] == [] and left["volumes"] == []
    assert left["archives"] == ["alpha/home.tar.gz"]

    # manual restore (what POST /restore does: desired WARM), then start it
    await stack.want("alpha", DesiredState.WARM)
    ws = await stack.wait_status("alpha", Status.WARM)
    assert ws.home_store_key and ws.archive_key  # the archive is kept after a restore
    await stack.want("alpha", DesiredState.RUNNING)
    await stack.wait_status("alpha", Status.RUNNING)
    assert await stack.manifest("alpha") == before

    # deleted: nothing is left anywhere
    await stack.want("alpha", DesiredState.DELETED)
    await stack.wait_gone("alpha")
    assert await stack.leftovers() == {"containers": [], "volumes": [], "archives": []}


async def test_container_killed_behind_our_back_is_restarted(stack: Stack) -> None:
    stack.run_controller()
    await stack.create("beta")
    await stack.wait_status("beta", Status.RUNNING)
    await stack.write_home("beta")
    before = await stack.manifest("beta")
    container = await stack.docker.containers.get(f"{stack.prefix}-ws-beta")
    await container.kill()
    # the periodic resync (every 5 s of clock time) observes the drift and restarts it
    async with asyncio.timeout(60):
        while (await stack.instances.get_status("beta")).state is not InstanceState.RUNNING:
            await stack.clock.advance(5)
            await asyncio.sleep(0.1)
    assert (await stack.instances.get_status("beta")).state.value == "RUNNING"
    assert await stack.manifest("beta") == before


async def test_vanished_volume_is_an_error_never_a_blank_home(stack: Stack) -> None:
    stack.run_controller()
    await stack.create("gamma", desired_state=DesiredState.WARM)
    ws = await stack.wait_status("gamma", Status.WARM)
    await stack.storage.delete_volume(ws.id, ws.home_store_key)  # the volume disappears
    await stack.want("gamma", DesiredState.RUNNING)
    ws = await stack.wait_status("gamma", Status.ERROR)
    assert ws.error_message and "missing" in ws.error_message
    assert ws.error_from_status is Status.WARM and ws.operation is Operation.NONE
    assert (await stack.leftovers())["volumes"] == []  # nothing was provisioned over it


async def test_orphans_labelled_as_ours_are_removed_on_election(stack: Stack) -> None:
    # resources of a workspace that has no row (e.g. its row was deleted by hand)
    key = await stack.storage.provision("orphan")
    await stack.instances.start("orphan", stack.image, key)
    c = stack.controller()
    removed = await c.remove_orphans()
    assert sorted(removed) == sorted([f"{stack.prefix}-ws-orphan", key])
    assert await stack.leftovers() == {"containers": [], "volumes": [], "archives": []}
