"""Activity tracking (codehub/gateway/activity.py) against the TTL sweep of the store."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from gateway_support import Stack, Upstream, client, open_stack, wait_for

from codehub.model import DesiredState

LONG_AGO = datetime.now(UTC) - timedelta(hours=2)


async def last_access(stack: Stack, workspace_id: str) -> datetime:
    row = await stack.store.get(workspace_id)
    assert row is not None
    return row.last_access_at


async def test_workspace_used_only_through_a_websocket_is_not_stepped_down(
        stack: Stack) -> None:
    await stack.add("echo", now=LONG_AGO)
    await stack.add("idle", now=LONG_AGO)
    ws_url = stack.url("/w/echo/_echo/ws").replace("http://", "ws://")
    async with client() as http, http.ws_connect(ws_url, headers=stack.headers()) as ws:
        for i in range(5):  # a few messages, like code-server's heartbeats
            await ws.send_str(f"beat {i}")
            await ws.receive()
            await asyncio.sleep(0.1)

        async def flushed() -> bool:
            return await last_access(stack, "echo") > LONG_AGO + timedelta(hours=1)

        await wait_for(flushed)
        stepped = await stack.store.sweep_warm(datetime.now(UTC), default_ttl_seconds=60)
    assert stepped == ["idle"]
    echo = await stack.store.get("echo")
    assert echo is not None and echo.desired_state is DesiredState.RUNNING


def record_flushes(stack: Stack) -> list[list[str]]:
    """The ids of every flush_activity call from now on (each call is one statement)."""
    flushes: list[list[str]] = []
    original = stack.store.flush_activity

    async def counting(ids, marks):  # type: ignore[no-untyped-def]
        flushes.append(list(ids))
        return await original(ids, marks)

    stack.store.flush_activity = counting  # type: ignore[method-assign]
    return flushes


async def test_http_requests_mark_the_workspace_in_one_batched_flush(
        database_url: str, echo_upstream: Upstream, tmp_path: Path) -> None:
    # The periodic flush is an hour away: what the requests write by themselves is seen
    # alone, and then the one flush that carries all of them.
    async for stack in open_stack(database_url, echo_upstream, tmp_path,
                                  activity_flush_interval=3600):
        await stack.add("echo", now=LONG_AGO)
        flushes = record_flushes(stack)
        async with client() as http:
            for _ in range(30):
                async with http.get(stack.url("/w/echo/"), headers=stack.headers()) as resp:
                    assert resp.status == 200
        assert flushes == []  # no request wrote anything itself
        assert await last_access(stack, "echo") == LONG_AGO
        assert await stack.gw.activity.flush() == 1
        assert flushes == [["echo"]]  # 30 requests, one statement
        assert await last_access(stack, "echo") > LONG_AGO + timedelta(hours=1)


async def test_a_failed_flush_keeps_its_marks_for_the_next_one(
        database_url: str, echo_upstream: Upstream, tmp_path: Path) -> None:
    async for stack in open_stack(database_url, echo_upstream, tmp_path,
                                  activity_flush_interval=3600):
        await stack.add("echo", now=LONG_AGO)
        async with client() as http, http.get(stack.url("/w/echo/"),
                                              headers=stack.headers()) as resp:
            assert resp.status == 200
        marked = stack.gw.activity.marks["echo"]
        # A real failure of the real statement: the table is not there for a moment.
        await stack.store.pool.execute("ALTER TABLE workspaces RENAME TO workspaces_away")
        try:
            assert await stack.gw.activity.flush() == 0
        finally:
            await stack.store.pool.execute("ALTER TABLE workspaces_away RENAME TO workspaces")
        assert stack.gw.activity.marks == {"echo": marked}
        assert await stack.gw.activity.flush() == 1
        assert (await last_access(stack, "echo")).timestamp() == pytest.approx(marked, abs=1e-3)


async def test_stopping_the_gateway_flushes_what_is_left(
        database_url: str, echo_upstream: Upstream, tmp_path: Path) -> None:
    async for stack in open_stack(database_url, echo_upstream, tmp_path,
                                  activity_flush_interval=3600):
        await stack.add("echo", now=LONG_AGO)
        async with client() as http, http.get(stack.url("/w/echo/"),
                                              headers=stack.headers()) as resp:
            assert resp.status == 200
        assert await last_access(stack, "echo") == LONG_AGO  # nothing flushed yet
    # open_stack has stopped the gateway (runner.cleanup) and closed its pool.
    conn = await asyncpg.connect(database_url)
    try:
        stamp = await conn.fetchval("SELECT last_access_at FROM workspaces WHERE id = 'echo'")
    finally:
        await conn.close()
    assert stamp > LONG_AGO + timedelta(hours=1)


async def test_silent_open_socket_counts_only_when_configured(
        database_url: str, echo_upstream: Upstream, tmp_path: Path) -> None:
    async for stack in open_stack(database_url, echo_upstream, tmp_path,
                                  websocket_keeps_active=True):
        await stack.add("echo", now=LONG_AGO)
        ws_url = stack.url("/w/echo/_echo/ws").replace("http://", "ws://")
        async with client() as http, http.ws_connect(ws_url, headers=stack.headers()):
            # Opening proxied one request (the upgrade) and marked it; clear the DB mark.
            await asyncio.sleep(0.5)
            await stack.store.pool.execute(
                "UPDATE workspaces SET last_access_at = $1", LONG_AGO)
            stack.gw.activity.marks.clear()

            async def flushed(s: Stack = stack) -> bool:
                return await last_access(s, "echo") > LONG_AGO + timedelta(hours=1)

            await wait_for(flushed)  # silent socket, yet marked at the next flush


async def test_silent_open_socket_does_not_count_by_default(stack: Stack) -> None:
    await stack.add("echo", now=LONG_AGO)
    ws_url = stack.url("/w/echo/_echo/ws").replace("http://", "ws://")
    async with client() as http, http.ws_connect(ws_url, headers=stack.headers()):
        await asyncio.sleep(0.5)
        await stack.store.pool.execute("UPDATE workspaces SET last_access_at = $1", LONG_AGO)
        stack.gw.activity.marks.clear()
        await asyncio.sleep(1.0)  # five flush intervals
        assert await last_access(stack, "echo") == LONG_AGO
