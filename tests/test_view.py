"""The one presenter (codehub/view.py): the API's shape and the loading page's / event
stream's shape show archive, failure and progress alike, times in UTC with a Z, and no
secret. Pure: no service needed."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import orjson

from codehub.config import Config
from codehub.model import Archive, DesiredState, Failure, Operation, Progress, Status, Workspace
from codehub.view import workspace_json, workspace_state

AT = datetime(2026, 1, 2, 3, 4, 5, 600_000, tzinfo=timezone(timedelta(hours=2)))


def bare() -> Workspace:
    return Workspace(
        id="w", owner="o", image_ref="i", desired_state=DesiredState.RUNNING,
        status=Status.WARM, operation=Operation.NONE, operation_started_at=None,
        home_store_key=None, archive_key=None, archive_size=None, archive_sha256=None,
        archive_created_at=None, last_access_at=AT, warm_ttl_seconds=None,
        cold_ttl_seconds=None, error_message=None, error_from_status=None, error_count=0,
        error_at=None, next_retry_at=None, progress_phase=None, progress_done=None,
        progress_total=None, generation=1, observed_generation=1, created_at=AT,
        updated_at=AT, access_nonce="secret-nonce")


def full() -> Workspace:
    return dataclasses.replace(
        bare(), operation=Operation.STARTING, archive_key="k", archive_size=3,
        archive_sha256="ab", archive_created_at=AT, error_message="boom", error_count=2,
        error_at=AT, progress_phase="pulling", progress_done=None, progress_total=10)


def test_value_objects_are_none_when_the_row_has_none() -> None:
    ws = bare()
    assert ws.archive is None and ws.failure is None and ws.progress is None


def test_value_objects_carry_the_row_and_progress_counts_from_zero() -> None:
    ws = full()
    assert ws.archive == Archive("k", 3, "ab", AT)
    assert ws.failure == Failure("boom", 2, AT)
    assert ws.progress == Progress("pulling", 0, 10)


def test_both_shapes_show_failure_and_progress_alike() -> None:
    api, state = workspace_json(full(), Config()), workspace_state(full(), ready=False)
    assert api["error"] == state["error"] == {
        "message": "boom", "count": 2, "at": "2026-01-02T01:04:05.600000Z"}
    assert api["progress"] == state["progress"] == {"phase": "pulling", "done": 0, "total": 10}
    assert api["archive"] == {"key": "k", "size": 3, "sha256": "ab",
                              "created_at": "2026-01-02T01:04:05.600000Z"}


def test_both_shapes_show_null_when_the_workspace_has_none() -> None:
    api, state = workspace_json(bare(), Config()), workspace_state(bare(), ready=True)
    assert api["archive"] is api["error"] is api["progress"] is None
    assert state == {"id": "w", "status": "WARM", "desired_state": "RUNNING",
                     "operation": "NONE", "progress": None, "error": None, "ready": True}


def test_no_workspace_is_unknown_and_not_ready() -> None:
    assert workspace_state(None, ready=True) == {"id": None, "status": "UNKNOWN",
                                                 "ready": False}


def test_times_are_utc_with_a_z() -> None:
    api = workspace_json(bare(), Config())
    assert api["created_at"] == api["updated_at"] == api["last_access_at"] == (
        AT.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"))


def test_no_secret_is_part_of_either_shape() -> None:
    for shape in (workspace_json(full(), Config()), workspace_state(full())):
        assert b"secret-nonce" not in orjson.dumps(shape)


def test_the_api_shows_effective_ttls_and_home_limit() -> None:
    cfg = Config()
    api = workspace_json(bare(), cfg)
    assert api["warm_ttl_seconds"] == cfg.reconciler.default_warm_ttl
    assert api["cold_ttl_seconds"] == cfg.reconciler.default_cold_ttl
    assert api["home_size_limit_mib"] == cfg.docker.home_size_limit_mib
    own = workspace_json(dataclasses.replace(bare(), warm_ttl_seconds=7,
                                             home_size_limit_mib=64), cfg)
    assert own["warm_ttl_seconds"] == 7 and own["home_size_limit_mib"] == 64
