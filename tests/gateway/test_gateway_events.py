"""The loading page's event stream and status endpoint (codehub/gateway/events.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
from gateway_support import ECHO_ID, Stack, client

from codehub.gateway import events
from codehub.model import DesiredState, Operation, Status


async def read_events(resp: object) -> tuple[list[dict[str, object]], list[str]]:
    states: list[dict[str, object]] = []
    comments: list[str] = []
    data = ""
    async for raw in resp.content:  # type: ignore[attr-defined]
        line = raw.decode().rstrip("\r\n")
        if line.startswith(":"):
            comments.append(line)
        elif line.startswith("data: "):
            data += line[6:]
        elif not line and data:
            states.append(json.loads(data))
            data = ""
    return states, comments


async def test_stream_follows_the_workspace_until_ready_then_ends(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "PING_INTERVAL", 0.2)
    await stack.add(status=Status.WARM, desired=DesiredState.RUNNING)

    async def reconcile() -> None:
        await asyncio.sleep(0.7)
        await stack.store.compare_and_set(ECHO_ID, expect_status=Status.WARM,
                                          expect_operation=Operation.NONE,
                                          operation=Operation.STARTING,
                                          progress_phase="pulling", progress_done=5,
                                          progress_total=10)
        await stack.hints.publish(ECHO_ID)
        await asyncio.sleep(0.7)
        await stack.store.compare_and_set(ECHO_ID, expect_status=Status.WARM,
                                          expect_operation=Operation.STARTING,
                                          status=Status.RUNNING, operation=Operation.NONE,
                                          progress_phase=None, progress_done=None,
                                          progress_total=None)
        await stack.hints.publish(ECHO_ID)

    task = asyncio.create_task(reconcile())
    async with client() as http, http.get(stack.url("/w/echo/_codehub/events"),
                                          headers=stack.headers()) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        states, comments = await asyncio.wait_for(read_events(resp), 20)
    await task
    assert states[0]["status"] == "WARM"
    assert any(s["operation"] == "STARTING" and s["progress"] == {
        "phase": "pulling", "done": 5, "total": 10} for s in states)
    assert states[-1]["status"] == "RUNNING" and states[-1]["ready"] is True
    assert all(not s["ready"] for s in states[:-1])
    assert comments  # keep-alive comments flowed while nothing changed


async def test_stream_ends_on_error_with_the_reason(stack: Stack) -> None:
    await stack.add("bad", status=Status.ERROR, desired=DesiredState.RUNNING,
                    error_message="boom", error_count=2)
    async with client() as http, http.get(stack.url("/w/bad/_codehub/events"),
                                          headers=stack.headers("bad")) as resp:
        states, _ = await asyncio.wait_for(read_events(resp), 10)
    assert len(states) == 1
    assert states[0]["status"] == "ERROR"
    assert states[0]["error"]["message"] == "boom"  # type: ignore[index]


async def test_status_endpoint_answers_the_same_state_once(stack: Stack) -> None:
    await stack.add()
    async with client() as http, http.get(stack.url("/w/echo/_codehub/status"),
                                          headers=stack.headers()) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        state = await resp.json()
    assert state["status"] == "RUNNING" and state["ready"] is True


async def test_own_paths_never_reach_the_workspace(stack: Stack) -> None:
    await stack.add()
    async with client() as http, http.get(stack.url("/w/echo/_codehub/anything"),
                                          headers=stack.headers()) as resp:
        assert resp.status == 404
        assert "method" not in await resp.text()
