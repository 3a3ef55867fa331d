"""The admin API on a real PostgreSQL: every endpoint, its success and each of its errors.

Named after the guarantees of codehub/api.py: declarative writes (desired_state/TTLs with
a compare-and-set, generation bumped, a hint, 202 where work follows), the transition
rules, keyset paging that survives concurrent changes, the exact workspace JSON, and the
OpenAPI document generated from the route table.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from apitools import SIGNING_KEY, RecordingHintBus, auth, make_app, make_config
from openapi_spec_validator import validate as validate_openapi

from codehub import api, keys, signing
from codehub.config import ReconcilerConfig, ServerConfig
from codehub.model import DesiredState, Operation, Status
from codehub.store import Store

Client = TestClient[web.Request, web.Application]
WS = "/api/v1/workspaces"


@pytest.fixture
async def client(database_url: str, aiohttp_client: Any) -> Client:
    app = await make_app(database_url)
    c: Client = await aiohttp_client(app)
    return c


def store_of(client: Client) -> Store:
    return client.app[keys.STORE]


def hints_of(client: Client) -> list[str]:
    bus = client.app[keys.HINTS]
    assert isinstance(bus, RecordingHintBus)
    return bus.published


async def call(client: Client, method: str, path: str, *, status: int,
               json: Any = None, **kw: Any) -> Any:
    resp = await client.request(method, path, json=json, headers=auth(), **kw)
    body = await resp.json()
    assert resp.status == status, body
    return body


async def error_code(client: Client, method: str, path: str, status: int, **kw: Any) -> str:
    body = await call(client, method, path, status=status, **kw)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    return str(body["error"]["code"])


async def put_in(db: Store, ws_id: str, *, status: Status,
                 desired: DesiredState | None = None,
                 operation: Operation = Operation.NONE, **changes: Any) -> None:
    """Move a row to a state as the reconciler would have left it."""
    ws = await db.get(ws_id)
    assert ws is not None
    if desired is not None and desired is not ws.desired_state:
        await db.set_desired(ws_id, desired)
    moved = await db.compare_and_set(ws_id, expect_status=ws.status,
                                     expect_operation=ws.operation, status=status,
                                     operation=operation, **changes)
    assert moved is not None


# --- create ------------------------------------------------------------------------------


async def test_create_returns_201_the_workspace_a_location_and_publishes_a_hint(
        client: Client) -> None:
    resp = await client.post(WS, json={"id": "alice-1", "owner": "alice", "image": "img:2",
                                       "desired_state": "WARM", "warm_ttl_seconds": 60,
                                       "cold_ttl_seconds": 3600}, headers=auth())
    body = await resp.json()
    assert resp.status == 201
    assert resp.headers["Location"] == f"{WS}/alice-1"
    assert body["id"] == "alice-1" and body["owner"] == "alice" and body["image"] == "img:2"
    assert body["desired_state"] == "WARM" and body["status"] == "NEW"
    assert body["operation"] == "NONE"
    assert body["warm_ttl_seconds"] == 60 and body["cold_ttl_seconds"] == 3600
    assert hints_of(client) == ["alice-1"]
    row = await store_of(client).get("alice-1")
    assert row is not None and row.desired_state is DesiredState.WARM


async def test_create_defaults_image_desired_state_and_effective_ttls(client: Client) -> None:
    body = await call(client, "POST", WS, json={"id": "w", "owner": "o"}, status=201)
    cfg = client.app[keys.CONFIG]
    assert body["image"] == cfg.docker.workspace_image
    assert body["desired_state"] == "RUNNING"
    assert body["warm_ttl_seconds"] == cfg.reconciler.default_warm_ttl
    assert body["cold_ttl_seconds"] == cfg.reconciler.default_cold_ttl
    row = await store_of(client).get("w")
    assert row is not None and row.warm_ttl_seconds is None  # stored as "the default"


async def test_create_without_id_generates_one_that_matches_the_id_pattern(
        client: Client) -> None:
    a = await call(client, "POST", WS, json={"owner": "o"}, status=201)
    b = await call(client, "POST", WS, json={"owner": "o"}, status=201)
    assert a["id"] != b["id"]
    assert all(re.fullmatch(api.ID_PATTERN, x["id"]) for x in (a, b))


async def test_create_with_a_taken_id_is_409(client: Client) -> None:
    await call(client, "POST", WS, json={"id": "w", "owner": "o"}, status=201)
    assert await error_code(client, "POST", WS, 409,
                            json={"id": "w", "owner": "p"}) == "already_exists"


@pytest.mark.parametrize("image", [
    "ubuntu", "ubuntu:24.04", "codercom/code-server:4.96.2", "ghcr.io/org/team/img:v1-rc.2",
    "localhost:5000/my_image", "registry.example.com:443/a/b__c--d",
    "img@sha256:" + "a" * 64, "quay.io/x/y:1@sha256:" + "0" * 64,
])
async def test_create_accepts_docker_image_references(client: Client, image: str) -> None:
    body = await call(client, "POST", WS, json={"owner": "o", "image": image}, status=201)
    assert body["image"] == image


@pytest.mark.parametrize(("body", "code"), [
    ({}, "invalid_request"),  # owner missing
    ({"owner": ""}, "invalid_request"),
    ({"owner": "has space"}, "invalid_request"),
    ({"owner": "o" * 129}, "invalid_request"),
    ({"owner": 7}, "invalid_request"),
    ({"owner": "o", "id": "Upper"}, "invalid_request"),
    ({"owner": "o", "id": "-lead"}, "invalid_request"),
    ({"owner": "o", "id": "a" * 64}, "invalid_request"),
    ({"owner": "o", "id": "a.b"}, "invalid_request"),
    ({"owner": "o", "image": "UPPER/case"}, "invalid_request"),
    ({"owner": "o", "image": "img:tag with space"}, "invalid_request"),
    ({"owner": "o", "image": "img;rm -rf /"}, "invalid_request"),
    ({"owner": "o", "image": "img@sha256:short"}, "invalid_request"),
    ({"owner": "o", "desired_state": "COLD"}, "invalid_request"),
    ({"owner": "o", "desired_state": "DELETED"}, "invalid_request"),
    ({"owner": "o", "desired_state": "running"}, "invalid_request"),
    ({"owner": "o", "warm_ttl_seconds": api.TTL_MIN - 1}, "invalid_request"),
    ({"owner": "o", "cold_ttl_seconds": api.TTL_MAX + 1}, "invalid_request"),
    ({"owner": "o", "warm_ttl_seconds": True}, "invalid_request"),
    ({"owner": "o", "warm_ttl_seconds": "60"}, "invalid_request"),
    ({"owner": "o", "warm_ttl_seconds": 60.5}, "invalid_request"),
    ({"owner": "o", "colour": "blue"}, "unknown_field"),
])
async def test_create_rejects_each_invalid_field_with_400_naming_it(
        client: Client, body: dict[str, Any], code: str) -> None:
    resp = await client.post(WS, json=body, headers=auth())
    err = (await resp.json())["error"]
    assert resp.status == 400 and err["code"] == code
    named = next(iter(set(body) - {"owner"}), "owner")
    assert named in err["message"]
    assert await store_of(client).list_page() == []


async def test_an_integral_float_counts_as_an_integer(client: Client) -> None:
    body = await call(client, "POST", WS, json={"owner": "o", "warm_ttl_seconds": 60.0},
                      status=201)
    assert body["warm_ttl_seconds"] == 60


@pytest.mark.parametrize(("raw", "code"), [
    (b"{not json", "invalid_json"), (b"", "invalid_json"), (b"[1, 2]", "invalid_request"),
    (b'"owner"', "invalid_request"), (b"null", "invalid_request"),
])
async def test_a_body_that_is_not_a_json_object_is_400(
        client: Client, raw: bytes, code: str) -> None:
    assert await error_code(client, "POST", WS, 400, data=raw) == code


async def test_a_body_over_the_limit_is_413(client: Client) -> None:
    big = b'{"owner": "' + b"o" * (70 * 1024) + b'"}'
    assert await error_code(client, "POST", WS, 413, data=big) == "body_too_large"

    async def chunks() -> Any:  # no Content-Length: counted while read
        for _ in range(70):
            yield b" " * 1024
    assert await error_code(client, "POST", WS, 413, data=chunks()) == "body_too_large"


# --- list --------------------------------------------------------------------------------


async def _create(client: Client, ws_id: str, owner: str = "o") -> None:
    await store_of(client).create(id=ws_id, owner=owner, image_ref="img")


async def test_list_pages_through_every_workspace_in_id_order(client: Client) -> None:
    ids = [f"w{i:02d}" for i in range(23)]
    for ws_id in reversed(ids):
        await _create(client, ws_id)
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": "10", **({"cursor": cursor} if cursor else {})}
        page = await call(client, "GET", WS, params=params, status=200)
        pages += 1
        seen += [w["id"] for w in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids and pages == 3


async def test_list_has_no_empty_last_page(client: Client) -> None:
    for i in range(4):
        await _create(client, f"w{i}")
    page = await call(client, "GET", WS, params={"limit": "4"}, status=200)
    assert len(page["items"]) == 4 and page["next_cursor"] is None
    assert (await call(client, "GET", WS, status=200))["items"][0]["id"] == "w0"


async def test_list_cursor_stays_correct_while_rows_are_created_and_deleted(
        client: Client) -> None:
    db = store_of(client)
    for i in range(0, 40, 2):  # w00, w02, ... w38
        await _create(client, f"w{i:02d}")
    survivors = {f"w{i:02d}" for i in range(0, 40, 2)}
    seen: list[str] = []
    cursor = None
    step = 0
    while True:
        params = {"limit": "5", **({"cursor": cursor} if cursor else {})}
        page = await call(client, "GET", WS, params=params, status=200)
        seen += [w["id"] for w in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        # between pages: rows appear before and after the cursor, others vanish
        await _create(client, f"w{step * 10 + 1:02d}")
        await _create(client, f"w{39 - step:02d}x")
        victim = f"w{30 + step * 2:02d}"
        if await db.delete_row(victim, expect_status=Status.NEW):
            survivors.discard(victim)
        step += 1
    assert seen == sorted(seen) and len(seen) == len(set(seen))  # in order, no repeats
    assert survivors <= set(seen)  # nothing that existed throughout was skipped


async def test_list_filters_by_status_and_owner(client: Client) -> None:
    db = store_of(client)
    await _create(client, "a1", "alice")
    await _create(client, "a2", "alice")
    await _create(client, "b1", "bob")
    await put_in(db, "a2", status=Status.WARM)
    by_owner = await call(client, "GET", WS, params={"owner": "alice"}, status=200)
    assert [w["id"] for w in by_owner["items"]] == ["a1", "a2"]
    by_status = await call(client, "GET", WS, params={"status": "NEW"}, status=200)
    assert [w["id"] for w in by_status["items"]] == ["a1", "b1"]
    both = await call(client, "GET", WS, params={"status": "WARM", "owner": "alice"},
                      status=200)
    assert [w["id"] for w in both["items"]] == ["a2"]


@pytest.mark.parametrize(("query", "code"), [
    ("limit=0", "invalid_request"), (f"limit={api.PAGE_MAX + 1}", "invalid_request"),
    ("limit=ten", "invalid_request"), ("limit=1.5", "invalid_request"),
    ("status=warm", "invalid_request"), ("status=NONE", "invalid_request"),
    ("owner=a%20b", "invalid_request"), ("limit=1&limit=2", "invalid_request"),
    ("page=2", "unknown_parameter"), ("cursor=bm90IGFuIGlk", "invalid_cursor"),  # "not an id"
    ("cursor=Zm9vL2Jhcg", "invalid_cursor"),  # "foo/bar"
    ("cursor=%24%24", "invalid_request"), ("cursor=A", "invalid_cursor"),
])
async def test_list_rejects_bad_parameters_with_400(
        client: Client, query: str, code: str) -> None:
    assert await error_code(client, "GET", f"{WS}?{query}", 400) == code


# --- get: the workspace object -----------------------------------------------------------


async def test_get_returns_exactly_the_documented_fields(client: Client) -> None:
    await _create(client, "w")
    body = await call(client, "GET", f"{WS}/w", status=200)
    assert list(body) == list(api.SCHEMAS["Workspace"]["properties"])
    assert body["archive"] is None and body["error"] is None and body["progress"] is None
    for key in ("last_access_at", "created_at", "updated_at"):
        assert body[key].endswith("Z")
        assert datetime.fromisoformat(body[key]).tzinfo is not None


async def test_get_shows_progress_error_and_archive_objects(client: Client) -> None:
    db = store_of(client)
    await _create(client, "w")
    at = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
    await put_in(db, "w", status=Status.WARM, desired=DesiredState.COLD,
                 operation=Operation.ARCHIVING, progress_phase="uploading",
                 progress_done=1024, progress_total=4096, error_message="archive failed: x",
                 error_count=2, error_at=at, archive_key="w/home.tar.gz", archive_size=99,
                 archive_sha256="ab" * 32, archive_created_at=at)
    body = await call(client, "GET", f"{WS}/w", status=200)
    assert body["progress"] == {"phase": "uploading", "done": 1024, "total": 4096}
    assert body["error"] == {"message": "archive failed: x", "count": 2,
                             "at": "2030-05-06T07:08:09.000000Z"}
    assert body["archive"] == {"key": "w/home.tar.gz", "size": 99, "sha256": "ab" * 32,
                               "created_at": "2030-05-06T07:08:09.000000Z"}
    assert body["operation"] == "ARCHIVING" and body["desired_state"] == "COLD"


async def test_get_unknown_is_404_and_a_bad_id_is_400(client: Client) -> None:
    assert await error_code(client, "GET", f"{WS}/nobody", 404) == "not_found"
    assert await error_code(client, "GET", f"{WS}/Bad_Id", 400) == "invalid_request"


# --- patch -------------------------------------------------------------------------------


async def test_patch_desired_state_is_202_bumps_generation_and_publishes_a_hint(
        client: Client) -> None:
    db = store_of(client)
    await _create(client, "w")
    await put_in(db, "w", status=Status.RUNNING)
    body = await call(client, "PATCH", f"{WS}/w", json={"desired_state": "WARM"}, status=202)
    assert body["desired_state"] == "WARM" and body["status"] == "RUNNING"
    row = await db.get("w")
    assert row is not None and row.generation == 2
    assert hints_of(client) == ["w"]


async def test_patch_ttls_only_is_200_and_keeps_the_ttl_not_given(client: Client) -> None:
    db = store_of(client)
    await db.create(id="w", owner="o", image_ref="i", warm_ttl_seconds=100,
                    cold_ttl_seconds=200)
    body = await call(client, "PATCH", f"{WS}/w", json={"warm_ttl_seconds": 300}, status=200)
    assert body["warm_ttl_seconds"] == 300 and body["cold_ttl_seconds"] == 200
    body = await call(client, "PATCH", f"{WS}/w", json={"cold_ttl_seconds": None}, status=200)
    assert body["cold_ttl_seconds"] == client.app[keys.CONFIG].reconciler.default_cold_ttl
    row = await db.get("w")
    assert row is not None and row.cold_ttl_seconds is None and row.generation == 3
    assert hints_of(client) == ["w", "w"]


async def test_patch_that_changes_nothing_writes_nothing(client: Client) -> None:
    await _create(client, "w")
    await call(client, "PATCH", f"{WS}/w", json={"desired_state": "RUNNING",
                                                 "warm_ttl_seconds": None}, status=200)
    row = await store_of(client).get("w")
    assert row is not None and row.generation == 1
    assert hints_of(client) == []


@pytest.mark.parametrize("desired", ["RUNNING", "WARM"])
async def test_patch_running_or_warm_on_a_cold_workspace_is_409_restore_required(
        client: Client, desired: str) -> None:
    db = store_of(client)
    await _create(client, "w")
    await put_in(db, "w", status=Status.COLD, desired=DesiredState.COLD)
    resp = await client.patch(f"{WS}/w", json={"desired_state": desired}, headers=auth())
    err = (await resp.json())["error"]
    assert resp.status == 409 and err["code"] == "restore_required"
    assert "restore" in err["message"]
    row = await db.get("w")
    assert row is not None and row.desired_state is DesiredState.COLD


async def test_patch_running_while_archiving_is_409_restore_required(client: Client) -> None:
    db = store_of(client)
    await _create(client, "w")
    await put_in(db, "w", status=Status.WARM, desired=DesiredState.COLD,
                 operation=Operation.ARCHIVING)
    assert await error_code(client, "PATCH", f"{WS}/w", 409,
                            json={"desired_state": "RUNNING"}) == "restore_required"


async def test_patch_on_a_cold_workspace_still_takes_ttls_and_cold(client: Client) -> None:
    db = store_of(client)
    await _create(client, "w")
    await put_in(db, "w", status=Status.COLD, desired=DesiredState.COLD)
    body = await call(client, "PATCH", f"{WS}/w", json={"cold_ttl_seconds": 600,
                                                        "desired_state": "COLD"}, status=200)
    assert body["cold_ttl_seconds"] == 600
    row = await db.get("w")
    assert row is not None and row.cold_ttl_seconds == 600  # stored, not only echoed


async def test_patch_of_a_restoring_workspace_may_choose_running(client: Client) -> None:
    db = store_of(client)
    await _create(client, "w")
    await put_in(db, "w", status=Status.COLD, desired=DesiredState.WARM,
                 operation=Operation.RESTORING)
    body = await call(client, "PATCH", f"{WS}/w", json={"desired_state": "RUNNING"},
                      status=202)
    assert body["desired_state"] == "RUNNING"


async def test_patch_of_a_deleting_workspace_is_409(client: Client) -> None:
    await _create(client, "w")
    await store_of(client).set_desired("w", DesiredState.DELETED)
    assert await error_code(client, "PATCH", f"{WS}/w", 409,
                            json={"warm_ttl_seconds": 60}) == "deleting"


@pytest.mark.parametrize(("body", "code"), [
    ({}, "invalid_request"), ({"desired_state": "DELETED"}, "invalid_request"),
    ({"desired_state": None}, "invalid_request"), ({"owner": "x"}, "unknown_field"),
    ({"warm_ttl_seconds": 1}, "invalid_request"),
])
async def test_patch_rejects_invalid_bodies_with_400(
        client: Client, body: dict[str, Any], code: str) -> None:
    await _create(client, "w")
    assert await error_code(client, "PATCH", f"{WS}/w", 400, json=body) == code


async def test_patch_unknown_is_404(client: Client) -> None:
    assert await error_code(client, "PATCH", f"{WS}/nobody", 404,
                            json={"desired_state": "WARM"}) == "not_found"


async def test_patch_rechecks_a_row_that_moved_after_it_was_checked(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check passed on WARM; the reconciler archived it before the write. The
    compare-and-set must fail and the re-check must refuse: no silent auto-restore."""
    db = store_of(client)
    await _create(client, "w")
    await put_in(db, "w", status=Status.WARM, desired=DesiredState.COLD)
    real = Store.update_spec
    calls = 0

    async def racing(self: Store, *args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            await put_in(db, "w", status=Status.COLD)  # the archive finished meanwhile
        return await real(self, *args, **kw)

    monkeypatch.setattr(Store, "update_spec", racing)
    assert await error_code(client, "PATCH", f"{WS}/w", 409,
                            json={"desired_state": "RUNNING"}) == "restore_required"
    row = await db.get("w")
    assert calls == 1 and row is not None and row.desired_state is DesiredState.COLD


# --- delete ------------------------------------------------------------------------------


async def test_delete_is_202_sets_desired_deleted_and_is_idempotent(client: Client) -> None:
    await _create(client, "w")
    body = await call(client, "DELETE", f"{WS}/w", status=202)
    assert body["desired_state"] == "DELETED"
    again = await call(client, "DELETE", f"{WS}/w", status=202)
    assert again["desired_state"] == "DELETED"
    row = await store_of(client).get("w")
    assert row is not None and row.generation == 2  # the second call wrote nothing
    assert hints_of(client) == ["w"]


async def test_delete_unknown_is_404(client: Client) -> None:
    assert await error_code(client, "DELETE", f"{WS}/nobody", 404) == "not_found"


# --- restore -----------------------------------------------------------------------------


async def test_restore_asks_a_cold_workspace_to_become_warm(client: Client) -> None:
    db = store_of(client)
    await _create(client, "w")
    await put_in(db, "w", status=Status.COLD, desired=DesiredState.COLD)
    body = await call(client, "POST", f"{WS}/w/restore", status=202)
    assert body["desired_state"] == "WARM" and body["status"] == "COLD"
    assert hints_of(client) == ["w"]


async def test_restore_with_start_continues_to_running(client: Client) -> None:
    db = store_of(client)
    await _create(client, "w")
    await put_in(db, "w", status=Status.COLD, desired=DesiredState.COLD)
    body = await call(client, "POST", f"{WS}/w/restore", json={"start": True}, status=202)
    assert body["desired_state"] == "RUNNING"


@pytest.mark.parametrize(("status", "desired", "code"), [
    (Status.WARM, None, "not_cold"), (Status.NEW, None, "not_cold"),
    (Status.RUNNING, None, "not_cold"), (Status.ERROR, None, "in_error"),
    (Status.COLD, DesiredState.DELETED, "deleting"),
])
async def test_restore_of_anything_but_cold_is_409(
        client: Client, status: Status, desired: DesiredState | None, code: str) -> None:
    await _create(client, "w")
    if status is not Status.NEW:
        await put_in(store_of(client), "w", status=status, desired=desired,
                     error_from_status=Status.COLD if status is Status.ERROR else None,
                     error_message="restore failed: checksum" if status is Status.ERROR
                     else None)
    elif desired is not None:
        await store_of(client).set_desired("w", desired)
    assert await error_code(client, "POST", f"{WS}/w/restore", 409) == code


async def test_restore_rejects_a_bad_body_and_an_unknown_workspace(client: Client) -> None:
    assert await error_code(client, "POST", f"{WS}/nobody/restore", 404) == "not_found"
    await _create(client, "w")
    assert await error_code(client, "POST", f"{WS}/w/restore", 400,
                            json={"start": "yes"}) == "invalid_request"


# --- retry -------------------------------------------------------------------------------


async def test_retry_returns_an_error_workspace_to_the_status_it_failed_from(
        client: Client) -> None:
    db = store_of(client)
    await _create(client, "w")
    await put_in(db, "w", status=Status.ERROR, operation=Operation.STARTING,
                 error_from_status=Status.WARM, error_message="start failed: boom",
                 error_count=8, error_at=datetime.now(UTC), next_retry_at=datetime.now(UTC))
    body = await call(client, "POST", f"{WS}/w/retry", status=202)
    assert body["status"] == "WARM" and body["operation"] == "STARTING"
    assert body["error"] is None
    row = await db.get("w")
    assert row is not None and row.error_count == 0 and row.next_retry_at is None
    assert row.error_from_status is None
    assert hints_of(client) == ["w"]


async def test_retry_of_a_workspace_not_in_error_is_409(client: Client) -> None:
    await _create(client, "w")
    assert await error_code(client, "POST", f"{WS}/w/retry", 409) == "not_in_error"
    assert await error_code(client, "POST", f"{WS}/nobody/retry", 404) == "not_found"


async def test_retry_without_a_recorded_status_is_409(client: Client) -> None:
    await _create(client, "w")
    await put_in(store_of(client), "w", status=Status.ERROR, error_message="x")
    assert await error_code(client, "POST", f"{WS}/w/retry", 409) == "cannot_retry"


# --- access links ------------------------------------------------------------------------


async def test_access_link_is_signed_for_that_workspace_and_expires(client: Client) -> None:
    await _create(client, "w")
    await _create(client, "other")
    before = time.time()
    body = await call(client, "POST", f"{WS}/w/access-links", json={"ttl_seconds": 120},
                      status=201)
    url = urlsplit(body["url"])
    assert url.path == "/w/w/" and url.netloc == f"{client.host}:{client.port}"
    token = parse_qs(url.query)["access"][0]
    keys_ = signing.SigningKeys((SIGNING_KEY.encode(),))
    assert signing.verify_access_link(keys_, "w", token, time.time()).verdict is \
        signing.Verdict.OK
    assert signing.verify_access_link(keys_, "other", token, time.time()).verdict is \
        signing.Verdict.INVALID
    expires = datetime.fromisoformat(body["expires_at"]).timestamp()
    assert before + 119 <= expires <= time.time() + 121
    assert signing.verify_access_link(keys_, "w", token, expires + 1).verdict is \
        signing.Verdict.EXPIRED


async def test_access_link_defaults_to_link_ttl_and_uses_public_url(
        database_url: str, aiohttp_client: Any) -> None:
    cfg = make_config(server=ServerConfig(public_url="https://code.example.com/"))
    client: Client = await aiohttp_client(await make_app(database_url, cfg))
    await _create(client, "w")
    body = await call(client, "POST", f"{WS}/w/access-links", status=201)
    assert body["url"].startswith("https://code.example.com/w/w/?access=")
    expires = datetime.fromisoformat(body["expires_at"]).timestamp()
    assert abs(expires - (time.time() + cfg.auth.link_ttl)) < 5


async def test_access_link_errors(client: Client) -> None:
    assert await error_code(client, "POST", f"{WS}/nobody/access-links", 404) == "not_found"
    await _create(client, "w")
    for ttl in (0, api.LINK_TTL_MAX + 1, "60"):
        assert await error_code(client, "POST", f"{WS}/w/access-links", 400,
                                json={"ttl_seconds": ttl}) == "invalid_request"
    await store_of(client).set_desired("w", DesiredState.DELETED)
    assert await error_code(client, "POST", f"{WS}/w/access-links", 409) == "deleting"


# --- the document and the error shape ----------------------------------------------------


async def test_openapi_document_is_valid_3_1_and_lists_every_route_of_the_table(
        client: Client) -> None:
    resp = await client.get("/api/v1/openapi.json")  # no token needed
    doc = await resp.json()
    assert resp.status == 200 and doc["openapi"] == "3.1.0"
    validate_openapi(doc)
    served = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == {(r.method, api.PREFIX + r.path) for r in api.ROUTES}
    create = doc["paths"][WS]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert create["properties"]["id"]["pattern"] == api.ID_PATTERN
    assert create["required"] == ["owner"]


async def test_the_documented_field_schemas_are_the_ones_that_validate(
        client: Client) -> None:
    """Widening a Field's schema changes what the API accepts and what it documents at
    once: they are the same object."""
    route = next(r for r in api.ROUTES if r.name == "createWorkspace")
    assert route.body is not None
    doc = api.build_document()
    props = doc["paths"][WS]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]
    for f in route.body.fields:
        assert {k: v for k, v in props[f.name].items() if k != "description"} == \
            dict(f.schema)


async def test_unknown_paths_and_methods_under_the_prefix_get_json_errors(
        client: Client) -> None:
    assert await error_code(client, "GET", "/api/v1/nothing", 404) == "not_found"
    resp = await client.put(WS, headers=auth())
    assert resp.status == 405 and set(resp.headers["Allow"].split(",")) == {"GET", "POST"}
    assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_api_handlers_never_touch_docker_or_object_storage(
        database_url: str, aiohttp_client: Any) -> None:
    """The app holds a Docker client, an object store, the instance controller and the
    storage provider, as app.py wires them in; no endpoint uses any of them."""
    app = await make_app(database_url, make_config(
        reconciler=ReconcilerConfig(default_warm_ttl=100)))
    touched: list[str] = []

    class Tripwire:
        """Stands in for one of them: records any use (and fails that request)."""

        def __init__(self, name: str) -> None:
            self.name = name

        def __getattr__(self, attr: str) -> Any:
            touched.append(f"{self.name}.{attr}")
            raise AssertionError(f"an API handler used {self.name}.{attr}")

    for name, key in (("docker", keys.DOCKER), ("objects", keys.OBJECTS),
                      ("instances", keys.INSTANCES), ("storage", keys.STORAGE)):
        app[key] = Tripwire(name)  # type: ignore[assignment]
    client: Client = await aiohttp_client(app)
    await call(client, "POST", WS, json={"id": "w", "owner": "o"}, status=201)
    await call(client, "GET", WS, status=200)
    await call(client, "GET", f"{WS}/w", status=200)
    await call(client, "PATCH", f"{WS}/w", json={"desired_state": "COLD"}, status=202)
    await call(client, "POST", f"{WS}/w/access-links", status=201)
    await call(client, "DELETE", f"{WS}/w", status=202)
    assert touched == []


async def test_asking_for_a_higher_tier_restarts_the_idle_time(client: Client) -> None:
    """Regression: a restore of a workspace idle for longer than its cold TTL kept the old
    last_access_at, so the TTL sweep archived it again straight after the restore."""
    db = store_of(client)
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    await db.create(id="w", owner="o", image_ref="i", now=long_ago)
    await put_in(db, "w", status=Status.COLD, desired=DesiredState.COLD)
    await call(client, "POST", f"{WS}/w/restore", status=202)
    row = await db.get("w")
    assert row is not None and row.last_access_at > long_ago
    assert await db.sweep_cold(datetime.now(UTC), 3600) == []
    await call(client, "PATCH", f"{WS}/w", json={"desired_state": "RUNNING"}, status=202)


async def test_stepping_down_or_changing_ttls_leaves_the_idle_time_alone(
        client: Client) -> None:
    db = store_of(client)
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    await db.create(id="w", owner="o", image_ref="i", now=long_ago)
    await call(client, "PATCH", f"{WS}/w", json={"warm_ttl_seconds": 60}, status=200)
    await call(client, "PATCH", f"{WS}/w", json={"desired_state": "WARM"}, status=202)
    row = await db.get("w")
    assert row is not None and row.last_access_at == long_ago


async def test_a_database_outage_is_503_with_retry_after_not_500(client: Client) -> None:
    await client.app[keys.POOL].close()
    resp = await client.get(WS, headers=auth())
    body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "unavailable"
    assert resp.headers["Retry-After"]
