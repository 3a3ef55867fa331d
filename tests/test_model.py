"""The transition table, walked over every (desired, status, operation) combination."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from codehub.model import (
    STEP_OF_OPERATION,
    TRANSITIONS,
    DesiredState,
    InstanceState,
    Observed,
    Operation,
    Status,
    Step,
    VolumeState,
    Workspace,
    decide,
    desire_refusal,
    restore_refusal,
)

ALL = list(itertools.product(DesiredState, Status, Operation))

# The tier each status stands on; the path a desired state is reached by.
TIER = {Status.RUNNING: 2, Status.WARM: 1, Status.NEW: 1, Status.COLD: 0}
GOAL = {DesiredState.RUNNING: 2, DesiredState.WARM: 1, DesiredState.COLD: 0}


def apply(step: Step, status: Status) -> Status:
    return TRANSITIONS[step].success if step in TRANSITIONS else status


@pytest.mark.parametrize(("desired", "status", "operation"), ALL)
def test_decide_is_total_and_consistent(desired: DesiredState, status: Status,
                                        operation: Operation) -> None:
    step = decide(desired, status, operation)
    assert isinstance(step, Step)
    if status is Status.DELETED:
        assert step is Step.NOTHING
    elif desired is DesiredState.DELETED:
        assert step is Step.DELETE
    elif status is Status.ERROR:
        assert step is Step.NOTHING  # waits for an admin
    elif operation is not Operation.NONE:
        # a recorded operation is resumed before anything else
        assert step is STEP_OF_OPERATION[operation]
    else:
        assert step is not Step.FAIL  # only observed drift can fail a workspace


OBSERVATIONS = [Observed(instance=i, volume=v)
                for i in (None, *InstanceState) for v in (None, *VolumeState)]


@pytest.mark.parametrize(("desired", "status", "operation"), ALL)
def test_decide_is_total_and_only_a_settled_warm_or_running_row_heeds_the_runtime(
        desired: DesiredState, status: Status, operation: Operation) -> None:
    """Whatever the runtime is seen to be, decide() answers; and what it sees changes the
    answer only for a WARM or RUNNING row with no operation recorded that is not being
    deleted: a recorded operation is resumed, a deletion deletes, ERROR waits, and NEW and
    COLD (which have no runtime) move on, whatever is observed."""
    unobserved = decide(desired, status, operation)
    steps = {o: decide(desired, status, operation, o) for o in OBSERVATIONS}
    assert all(isinstance(step, Step) for step in steps.values())
    settled = (operation is Operation.NONE and desired is not DesiredState.DELETED
               and status in (Status.WARM, Status.RUNNING))
    if not settled:
        assert set(steps.values()) == {unobserved}, steps


@pytest.mark.parametrize("desired", [d for d in DesiredState if d is not DesiredState.DELETED])
@pytest.mark.parametrize("start", [Status.NEW, Status.WARM, Status.RUNNING, Status.COLD])
def test_repeated_steps_converge_to_desired_tier(desired: DesiredState, start: Status) -> None:
    status, seen = start, []
    for _ in range(6):
        step = decide(desired, status, Operation.NONE)
        if step is Step.NOTHING:
            break
        seen.append(step)
        status = apply(step, status)
    assert decide(desired, status, Operation.NONE) is Step.NOTHING, seen
    assert TIER[status] == GOAL[desired]
    assert status is not Status.NEW


def test_every_step_records_a_distinct_operation() -> None:
    ops = [t.operation for t in TRANSITIONS.values()]
    assert len(set(ops)) == len(ops)
    assert Operation.NONE not in ops
    assert set(STEP_OF_OPERATION) == set(Operation) - {Operation.NONE}


def test_cold_never_goes_straight_to_running() -> None:
    assert decide(DesiredState.RUNNING, Status.COLD, Operation.NONE) is Step.RESTORE
    assert TRANSITIONS[Step.RESTORE].success is Status.WARM


@pytest.mark.parametrize("status", [Status.WARM, Status.RUNNING])
@pytest.mark.parametrize("desired", [DesiredState.RUNNING, DesiredState.WARM, DesiredState.COLD])
def test_vanished_volume_fails_never_reprovisions(status: Status, desired: DesiredState) -> None:
    step = decide(desired, status, Operation.NONE, Observed(volume=VolumeState.MISSING))
    assert step is Step.FAIL


@pytest.mark.parametrize("instance", [InstanceState.MISSING, InstanceState.FAILED,
                                      InstanceState.STOPPED])
def test_dead_container_of_running_workspace_is_restarted(instance: InstanceState) -> None:
    observed = Observed(instance=instance, volume=VolumeState.PRESENT)
    assert decide(DesiredState.RUNNING, Status.RUNNING, Operation.NONE, observed) is Step.START


def test_dead_container_is_not_restarted_when_stepping_down() -> None:
    observed = Observed(instance=InstanceState.MISSING, volume=VolumeState.PRESENT)
    assert decide(DesiredState.WARM, Status.RUNNING, Operation.NONE, observed) is Step.STOP


def test_stray_container_of_warm_workspace_is_removed() -> None:
    observed = Observed(instance=InstanceState.RUNNING, volume=VolumeState.PRESENT)
    assert decide(DesiredState.WARM, Status.WARM, Operation.NONE, observed) is Step.STOP


@pytest.mark.parametrize("operation", list(Operation))
def test_delete_wins_over_any_operation(operation: Operation) -> None:
    for status in Status:
        if status is not Status.DELETED:
            assert decide(DesiredState.DELETED, status, operation) is Step.DELETE


def _row(desired: DesiredState, status: Status, operation: Operation,
         failed_from: Status | None = None) -> Workspace:
    now = datetime.now(UTC)
    return Workspace(
        id="w", owner="o", image_ref="i", desired_state=desired, status=status,
        operation=operation, operation_started_at=None, home_store_key=None, archive_key=None,
        archive_size=None, archive_sha256=None, archive_created_at=None, last_access_at=now,
        warm_ttl_seconds=None, cold_ttl_seconds=None, error_message="boom",
        error_from_status=failed_from, error_count=0, error_at=None, next_retry_at=None,
        progress_phase=None, progress_done=None, progress_total=None, generation=1,
        observed_generation=1, created_at=now, updated_at=now)


@pytest.mark.parametrize(("desired", "status", "operation"), ALL)
def test_a_wish_is_refused_only_while_deleting_or_when_an_archive_needs_a_restore(
        desired: DesiredState, status: Status, operation: Operation) -> None:
    ws = _row(desired, status, operation, failed_from=Status.COLD)
    deleting = desired is DesiredState.DELETED or status is Status.DELETED
    settled = Status.COLD if status is Status.ERROR else status
    archived = desired is DesiredState.COLD and (
        settled is Status.COLD or operation is Operation.ARCHIVING)
    for wish in (None, *DesiredState):
        refusal = desire_refusal(ws, wish)
        up = wish in (DesiredState.RUNNING, DesiredState.WARM)
        expected = "deleting" if deleting else "restore_required" if up and archived else None
        assert (refusal.code if refusal else None) == expected, (wish, ws)
    refusal = restore_refusal(ws)
    expected = ("deleting" if deleting else "in_error" if status is Status.ERROR
                else None if status is Status.COLD else "not_cold")
    assert (refusal.code if refusal else None) == expected
