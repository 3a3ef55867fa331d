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
from reconciler_stack import Stack

from codehub import keys, metrics
from codehub.model import DesiredState, Operation, Status
from codehub.reconciler.leader import LeaderElector

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


def value(name: str, **labels: str) -> float:
    got = metrics.REGISTRY.get_sample_value(name, labels or None)
    return 0.0 if got is None else got


async def test_the_leader_gauge_is_1_exactly_while_this_replica_leads(
        client: Client, database_url: str) -> None:
    # The proxy's and relay's metrics are driven through a real gateway in
    # tests/gateway/test_gateway_metrics.py; here the leader and the reconciler.
    leading = asyncio.Event()

    async def lead() -> None:
        leading.set()
        await asyncio.Event().wait()

    assert (await scrape(client))[("codehub_leader", ())] == 0
    elector = LeaderElector(database_url, lead, check_interval=0.2, lock_id=4250)
    task = asyncio.create_task(elector.run())
    try:
        async with asyncio.timeout(30):
            await leading.wait()
        assert (await scrape(client))[("codehub_leader", ())] == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert (await scrape(client))[("codehub_leader", ())] == 0


async def test_the_reconciler_counts_its_operations_and_the_bytes_it_moves(
        stack: Stack) -> None:
    kinds = ("PROVISIONING", "ARCHIVING", "RESTORING")
    started = {k: value("codehub_operations_started_total", kind=k) for k in kinds}
    archived = value("codehub_archived_bytes_total")
    restored = value("codehub_restored_bytes_total")
    hint_lags = value("codehub_hint_lag_seconds_count")
    stack.run_controller()
    await stack.create("m", desired_state=DesiredState.WARM)
    await stack.wait_status("m", Status.WARM)
    await stack.want("m", DesiredState.COLD)
    cold = await stack.wait_status("m", Status.COLD)
    assert cold.archive_size
    assert value("codehub_archived_bytes_total") - archived == cold.archive_size
    await stack.want("m", DesiredState.WARM)
    await stack.wait_status("m", Status.WARM)
    assert value("codehub_restored_bytes_total") - restored == cold.archive_size
    for k in kinds:
        assert value("codehub_operations_started_total", kind=k) - started[k] == 1, k
    assert value("codehub_hint_lag_seconds_count") - hint_lags >= 3  # one per step begun


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
