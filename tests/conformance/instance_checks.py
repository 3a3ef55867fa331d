"""What every InstanceController guarantees (codehub/interfaces.py), one check per guarantee.

Each `check_*` takes an InstanceKit and fails (AssertionError or pytest.fail) when the
controller breaks the guarantee its name states. test_conformance_instances.py runs every
check against every implementation; test_conformance_suite.py shows that a broken
implementation fails them.
"""

from __future__ import annotations

import pytest
from conformance_kits import InstanceKit
from conformance_tools import assert_lifetime, cancel_when, must_succeed

from codehub.interfaces import AdapterError, PermanentError
from codehub.model import InstanceState

W1, W2 = "w1", "w2"


async def _state(kit: InstanceKit, workspace_id: str) -> InstanceState:
    return (await kit.controller.get_status(workspace_id)).state


async def _ids(kit: InstanceKit) -> list[str]:
    found = await kit.controller.list_managed()
    assert all(r.kind == "container" for r in found), found
    return [r.workspace_id for r in found]


async def check_start_is_idempotent_and_reuses_the_running_instance(kit: InstanceKit) -> None:
    volume = await kit.make_volume(W1)
    await kit.controller.start(W1, kit.image, volume)
    first = await kit.instance_token(W1)
    assert first is not None
    await must_succeed(kit.controller.start(W1, kit.image, volume), "a second start")
    assert await kit.instance_token(W1) == first, "a second start replaced the instance"
    for _ in range(2):
        assert await _state(kit, W1) is InstanceState.RUNNING
    upstreams = [await kit.controller.resolve_upstream(W1) for _ in range(2)]
    assert upstreams[0] == upstreams[1]
    assert await _ids(kit) == [W1]


async def check_stop_and_delete_are_idempotent_and_leave_the_volume(kit: InstanceKit) -> None:
    volume = await kit.make_volume(W1)
    await must_succeed(kit.controller.stop(W1), "stop of a workspace never started")
    await must_succeed(kit.controller.delete(W1), "delete of a workspace never started")
    for remove in (kit.controller.stop, kit.controller.delete):
        await kit.controller.start(W1, kit.image, volume)
        for attempt in ("a first", "a second"):
            await must_succeed(remove(W1), f"{attempt} {remove.__name__}")
            assert await _state(kit, W1) is InstanceState.MISSING
        with pytest.raises(AdapterError):
            await kit.controller.resolve_upstream(W1)
        assert await kit.volume_exists(volume), f"{remove.__name__} touched the volume"
    assert await _ids(kit) == []


async def check_start_replaces_an_instance_that_died_behind_its_back(kit: InstanceKit) -> None:
    volume = await kit.make_volume(W1)
    await kit.controller.start(W1, kit.image, volume)
    old = await kit.instance_token(W1)
    await kit.kill(W1)
    for _ in range(2):  # observing changes nothing
        status = await kit.controller.get_status(W1)
        assert status.state is InstanceState.FAILED, status
        assert status.exit_code == 137, status
    with pytest.raises(AdapterError):
        await kit.controller.resolve_upstream(W1)
    await kit.controller.start(W1, kit.image, volume)
    new = await kit.instance_token(W1)
    assert new is not None and new != old, "start kept an instance that had died"
    assert await _state(kit, W1) is InstanceState.RUNNING
    await kit.controller.start(W1, kit.image, volume)
    assert await kit.instance_token(W1) == new


async def check_start_replaces_a_running_instance_on_another_volume(kit: InstanceKit) -> None:
    first_volume, other_volume = await kit.make_volume(W1), await kit.make_volume(W2)
    await kit.controller.start(W1, kit.image, first_volume)
    old = await kit.instance_token(W1)
    await kit.controller.start(W1, kit.image, other_volume)  # e.g. after a restore
    new = await kit.instance_token(W1)
    assert new is not None and new != old, "start kept an instance on the old volume"
    assert await _state(kit, W1) is InstanceState.RUNNING
    assert await _ids(kit) == [W1]


async def check_start_refuses_a_volume_that_does_not_exist(kit: InstanceKit) -> None:
    volume = await kit.make_volume(W1)
    missing = volume + "-missing"
    with pytest.raises(PermanentError):
        await kit.controller.start(W1, kit.image, missing)
    assert not await kit.volume_exists(missing), "start made the missing volume"
    assert await _state(kit, W1) is InstanceState.MISSING
    assert await _ids(kit) == []


async def check_start_with_a_missing_image_is_permanent_and_names_it(kit: InstanceKit) -> None:
    volume = await kit.make_volume(W1)
    with pytest.raises(PermanentError) as caught:
        await kit.controller.start(W1, kit.missing_image, volume)
    assert kit.missing_image in str(caught.value)
    assert not caught.value.retryable
    assert await _state(kit, W1) is InstanceState.MISSING


async def check_get_status_of_an_unknown_workspace_is_missing_and_changes_nothing(
        kit: InstanceKit) -> None:
    for _ in range(2):
        status = await kit.controller.get_status(W1)
        assert status.state is InstanceState.MISSING, status
    with pytest.raises(AdapterError):
        await kit.controller.resolve_upstream(W1)
    assert await _ids(kit) == []


async def check_an_invalid_workspace_id_is_a_permanent_error(kit: InstanceKit) -> None:
    volume = await kit.make_volume(W1)
    for bad in ("Bad_Id", "../w1", "-w1", ""):
        with pytest.raises(PermanentError):
            await kit.controller.start(bad, kit.image, volume)
        with pytest.raises(PermanentError):
            await kit.controller.stop(bad)
        with pytest.raises(PermanentError):
            await kit.controller.get_status(bad)
    assert await _ids(kit) == []


async def check_a_start_cancelled_midway_then_run_again_leaves_one_running_instance(
        kit: InstanceKit) -> None:
    volume = await kit.make_volume(W1)

    async def made() -> bool:
        return await kit.instance_token(W1) is not None

    assert await cancel_when(kit.controller.start(W1, kit.image, volume), made), \
        "start ended before it could be cut once its instance existed"
    await must_succeed(kit.controller.start(W1, kit.image, volume),
                       "start after a cancelled start")
    assert await _state(kit, W1) is InstanceState.RUNNING
    assert await _ids(kit) == [W1]
    await kit.controller.resolve_upstream(W1)


async def check_list_managed_reports_every_instance_and_forgets_removed_ones(
        kit: InstanceKit) -> None:
    for wid in (W1, W2):
        await kit.controller.start(wid, kit.image, await kit.make_volume(wid))
    assert sorted(await _ids(kit)) == [W1, W2]
    names = [r.name for r in await kit.controller.list_managed()]
    assert names == sorted(names) and len(set(names)) == 2
    await kit.controller.stop(W1)
    assert await _ids(kit) == [W2]
    await kit.controller.delete(W2)
    assert await _ids(kit) == []


async def check_works_as_an_async_context_manager_and_closes(kit: InstanceKit) -> None:
    await assert_lifetime(kit.controller, lambda: kit.controller.get_status(W1), kit.released)


CHECKS = [f for name, f in list(globals().items()) if name.startswith("check_")]
