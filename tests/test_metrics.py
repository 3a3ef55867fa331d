"""/metrics parsed with prometheus-client's own text parser; values follow what happens.

Guarantees of codehub/metrics.py pinned here: workspaces by status are counted from the
database at scrape time (they move as rows move, and vanish rather than go stale when the
database is down), the recording helpers move their series, cancellation is not a
failure, and no label carries a workspace id.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from apitools import auth, make_app
from prometheus_client.parser import text_string_to_metric_families

from codehub import keys, metrics
from codehub.model import DesiredState, Operation, Status

Client = TestClient[web.Request, web.Application]

# Every family the issue names, by its exposed name (counters without the _total suffix).
FAMILIES = {
    "codehub_workspaces", "codehub_operations_started", "codehub_operations_failed",
    "codehub_operation_duration_seconds", "codehub_proxy_requests", "codehub_proxy_errors",
    "codehub_websocket_connections", "codehub_websocket_connections_opened",
    "codehub_archived_bytes", "codehub_restored_bytes", "codehub_leader",
    "codehub_hint_lag_seconds", "codehub_activity_flush_lag_seconds",
    "codehub_activity_flush_last_timestamp_seconds", "codehub_api_requests",
}


@pytest.fixture
async def client(database_url: str, aiohttp_client: Any) -> Client:
    c: Client = await aiohttp_client(await make_app(database_url))
    return c


async def scrape(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def families(client: Client) -> set[str]:
    resp = await client.get("/metrics")
    return {f.name for f in text_string_to_metric_families(await resp.text())}


def by_status(samples: dict[Any, float]) -> dict[str, float]:
    return {dict(labels)["status"]: v for (name, labels), v in samples.items()
            if name == "codehub_workspaces"}


async def test_metrics_parse_and_expose_every_named_family(client: Client) -> None:
    assert await families(client) >= FAMILIES
    assert "process_resident_memory_bytes" in await families(client)


async def test_workspaces_by_status_follow_the_database(client: Client) -> None:
    db = client.app[keys.STORE]
    assert by_status(await scrape(client)) == {s.value: 0 for s in Status}
    for i in range(3):
        await client.post("/api/v1/workspaces", json={"id": f"w{i}", "owner": "o"},
                          headers=auth())
    assert by_status(await scrape(client))["NEW"] == 3
    await db.compare_and_set("w0", expect_status=Status.NEW, expect_operation=Operation.NONE,
                             status=Status.WARM)
    await db.compare_and_set("w1", expect_status=Status.NEW, expect_operation=Operation.NONE,
                             status=Status.COLD)
    counts = by_status(await scrape(client))
    assert (counts["NEW"], counts["WARM"], counts["COLD"], counts["RUNNING"]) == (1, 1, 1, 0)
    await db.set_desired("w1", DesiredState.DELETED)
    await db.compare_and_set("w1", expect_status=Status.COLD, expect_operation=Operation.NONE,
                             status=Status.DELETED)
    await db.delete_row("w1", expect_status=Status.DELETED)
    assert by_status(await scrape(client))["COLD"] == 0


async def test_workspace_counts_are_left_out_not_stale_when_the_database_is_down(
        client: Client) -> None:
    await client.post("/api/v1/workspaces", json={"owner": "o"}, headers=auth())
    assert by_status(await scrape(client))["NEW"] == 1
    await client.app[keys.POOL].close()
    samples = await scrape(client)
    assert by_status(samples) == {}
    assert ("codehub_leader", ()) in samples  # the rest is still served


async def test_operation_helper_counts_started_failed_and_duration(client: Client) -> None:
    before = await scrape(client)
    with metrics.operation("ARCHIVING"):
        await asyncio.sleep(0)
    with pytest.raises(RuntimeError), metrics.operation("ARCHIVING"):
        raise RuntimeError("boom")
    after = await scrape(client)
    kind = (("kind", "ARCHIVING"),)
    assert after[("codehub_operations_started_total", kind)] - \
        before[("codehub_operations_started_total", kind)] == 2
    assert after[("codehub_operations_failed_total", kind)] - \
        before[("codehub_operations_failed_total", kind)] == 1
    assert after[("codehub_operation_duration_seconds_count", kind)] - \
        before[("codehub_operation_duration_seconds_count", kind)] == 2


async def test_a_cancelled_operation_is_not_a_failure(client: Client) -> None:
    before = await scrape(client)

    async def work() -> None:
        with metrics.operation("STARTING"):
            await asyncio.sleep(3600)

    task = asyncio.create_task(work())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after = await scrape(client)
    kind = (("kind", "STARTING"),)
    assert after[("codehub_operations_failed_total", kind)] == \
        before[("codehub_operations_failed_total", kind)]
    assert after[("codehub_operations_started_total", kind)] - \
        before[("codehub_operations_started_total", kind)] == 1


async def test_every_operation_kind_is_exposed_before_it_first_runs(client: Client) -> None:
    samples = await scrape(client)
    for op in Operation:
        if op is not Operation.NONE:
            assert ("codehub_operations_started_total", (("kind", op.value),)) in samples


async def test_hot_path_and_reconciler_instruments_move(client: Client) -> None:
    before = await scrape(client)
    metrics.PROXY_REQUESTS.inc()
    metrics.PROXY_REQUESTS.inc()
    metrics.PROXY_ERRORS.inc()
    metrics.WEBSOCKETS_OPEN.inc()
    metrics.WEBSOCKETS_OPENED.inc()
    metrics.BYTES_ARCHIVED.inc(1000)
    metrics.BYTES_RESTORED.inc(500)
    metrics.HINT_LAG.observe(0.02)
    metrics.activity_flushed(1.5)
    metrics.LEADER.set(1)
    try:
        after = await scrape(client)
    finally:
        metrics.WEBSOCKETS_OPEN.dec()
        metrics.LEADER.set(0)

    def delta(name: str) -> float:
        return after[(name, ())] - before.get((name, ()), 0.0)

    assert delta("codehub_proxy_requests_total") == 2
    assert delta("codehub_proxy_errors_total") == 1
    assert delta("codehub_websocket_connections") == 1
    assert delta("codehub_websocket_connections_opened_total") == 1
    assert delta("codehub_archived_bytes_total") == 1000
    assert delta("codehub_restored_bytes_total") == 500
    assert delta("codehub_hint_lag_seconds_count") == 1
    assert after[("codehub_activity_flush_lag_seconds", ())] == 1.5
    assert after[("codehub_activity_flush_last_timestamp_seconds", ())] > 0
    assert after[("codehub_leader", ())] == 1


async def test_api_requests_are_counted_by_route_template_never_by_id(
        client: Client) -> None:
    await client.post("/api/v1/workspaces", json={"id": "secret-id", "owner": "o"},
                      headers=auth())
    await client.get("/api/v1/workspaces/secret-id", headers=auth())
    await client.get("/api/v1/workspaces/other-id", headers=auth())
    await client.request("FROBNICATE", "/api/v1/workspaces")
    samples = await scrape(client)
    key = ("codehub_api_requests_total", (("code", "200"), ("method", "GET"),
                                          ("route", "/api/v1/workspaces/{id}")))
    assert samples[key] >= 1
    text = await (await client.get("/metrics")).text()
    assert "secret-id" not in text and "other-id" not in text
    assert "FROBNICATE" not in text
