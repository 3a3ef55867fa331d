"""Idle means nobody is working (issue #14): how the gateway sorts what it relays
(idle.py, tunnel.py), the presence endpoint (presence.py) and the step-down metric.

The sockets here speak VS Code's remote protocol to the echo workspace, which sends every
binary message back: both directions carry the same protocol messages, as with
code-server. What a real code-server tab does is in test_gateway_idle_browser.py.
"""

from __future__ import annotations

import asyncio
import os
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from gateway_support import Stack, Upstream, client, open_stack, wait_for

from codehub.gateway import idle, presence
from codehub.gateway.tunnel import MARK_EVERY
from codehub.metrics import STEPPED_DOWN_UNDER_OPEN_TAB
from codehub.model import DesiredState, Status

LONG_AGO = datetime.now(UTC) - timedelta(hours=2)
AUTH = b'{"type":"auth","auth":"00000000000000000000"}'


def message(kind: int, body: bytes = b"", msg_id: int = 0, ack: int = 0) -> bytes:
    """One message of VS Code's remote protocol: a 13-byte header and its body."""
    return struct.pack(">BIII", kind, msg_id, ack, len(body)) + body


def frame(payload: bytes, *, masked: bool, opcode: int = 0x2) -> bytes:
    """One final WebSocket frame, as the browser (masked) or the workspace sends it."""
    n = len(payload)
    bit = 0x80 if masked else 0
    head = bytes([0x80 | opcode, bit | n]) if n < 126 else (
        bytes([0x80 | opcode, bit | 126]) + n.to_bytes(2, "big"))
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# --- sorting chunks (pure) ---------------------------------------------------------------

def test_a_browser_chunk_starting_with_a_vscode_message_speaks_vscode() -> None:
    assert idle.speaks_vscode(frame(message(idle.CONTROL, AUTH), masked=True))
    assert idle.speaks_vscode(frame(message(idle.CONTROL, AUTH * 4), masked=True))  # 16-bit
    assert idle.speaks_vscode(frame(message(idle.KEEP_ALIVE), masked=True))


def test_anything_else_does_not_speak_vscode() -> None:
    assert not idle.speaks_vscode(frame(b"hello there, not a protocol", masked=True))
    assert not idle.speaks_vscode(frame(AUTH, masked=True, opcode=0x1))  # text
    body = message(idle.CONTROL, AUTH)
    assert not idle.speaks_vscode(frame(body + b"x", masked=True))  # length field is off
    assert not idle.speaks_vscode(frame(bytes([42]) + body[1:], masked=True))  # no such type
    assert not idle.speaks_vscode(frame(body, masked=False))  # a browser masks
    assert not idle.speaks_vscode(frame(body, masked=True)[:10])  # cut short


def test_keepalives_acks_control_and_small_regular_messages_do_not_count() -> None:
    for masked in (True, False):
        for quiet in (message(idle.KEEP_ALIVE), message(idle.ACK, ack=7),
                      message(idle.CONTROL, AUTH), message(idle.DISCONNECT),
                      message(idle.REGULAR, b"x" * (idle.QUIET_REGULAR - idle.HEADER))):
            assert not idle.counts(frame(quiet, masked=masked), masked=masked), quiet
        assert not idle.counts(frame(b"ping", masked=masked, opcode=0x9), masked=masked)
        assert not idle.counts(frame(b"pong", masked=masked, opcode=0xA), masked=masked)


def test_larger_regular_messages_and_what_cannot_be_read_count() -> None:
    for masked in (True, False):
        big = message(idle.REGULAR, b"x" * (idle.QUIET_REGULAR - idle.HEADER + 1))
        assert idle.counts(frame(big, masked=masked), masked=masked)
        huge = message(idle.REGULAR, b"x" * 5000)
        assert idle.counts(frame(huge, masked=masked), masked=masked)
        assert idle.counts(frame(huge, masked=masked)[200:200 + idle.QUIET_CHUNK + 1],
                           masked=masked)  # a larger read from the middle of a message
        assert idle.counts(frame(b"text", masked=masked, opcode=0x1), masked=masked)
        assert idle.counts(frame(bytes([42]) * 20, masked=masked), masked=masked)
        assert idle.counts(b"\x82", masked=masked)
        # VS Code's writer joins messages into one frame: an Ack before a small background
        # message stays quiet, an Ack before a key press counts
        ping = message(idle.REGULAR, b"p" * 25)
        key = message(idle.REGULAR, b"k" * 38)
        assert not idle.counts(frame(message(idle.ACK) + ping, masked=masked), masked=masked)
        assert idle.counts(frame(message(idle.ACK) + key, masked=masked), masked=masked)
        assert idle.counts(frame(message(idle.KEEP_ALIVE) + key, masked=masked),
                           masked=masked)
        # two quiet frames in one read stay quiet; a quiet one before a big one counts
        two = frame(message(idle.KEEP_ALIVE), masked=masked) * 2
        assert not idle.counts(two, masked=masked)
        assert idle.counts(frame(message(idle.ACK), masked=masked) + frame(huge, masked=masked),
                           masked=masked)


# --- through the gateway -------------------------------------------------------------------

def record_marks(stack: Stack) -> list[str]:
    marks: list[str] = []
    original = stack.gw.activity.mark

    def mark(workspace_id: str) -> None:
        marks.append(workspace_id)
        original(workspace_id)

    stack.gw.activity.mark = mark  # type: ignore[method-assign]
    return marks


async def send_due(ws: aiohttp.ClientWebSocketResponse, data: bytes) -> None:
    """Send a binary message and read its echo, once a mark is due on both sides again."""
    await asyncio.sleep(MARK_EVERY * 1.2)
    await ws.send_bytes(data)
    echoed = await ws.receive_bytes()
    assert echoed == data


async def test_a_vscode_socket_marks_only_what_a_person_caused(stack: Stack) -> None:
    await stack.add("echo", now=LONG_AGO)
    ws_url = stack.url("/w/echo/_echo/ws").replace("http://", "ws://")
    marks = record_marks(stack)
    async with client() as http, http.ws_connect(ws_url, headers=stack.headers()) as ws:
        await send_due(ws, message(idle.CONTROL, AUTH))  # the workbench's first message
        tunnel_marks = len(marks)
        # An untouched workbench: keep-alives, acks, small background messages.
        for quiet in (message(idle.KEEP_ALIVE), message(idle.ACK, ack=1),
                      message(idle.REGULAR, b"r" * 25, msg_id=1)):
            await send_due(ws, quiet)
        assert len(marks) == tunnel_marks, marks
        # A line of terminal output (or a key typed in the editor): a larger message.
        await send_due(ws, message(idle.REGULAR, b"Thu Dec  3 13:25:10 UTC 2026\r\n" * 2))
        assert len(marks) > tunnel_marks
    assert set(marks) == {"echo"}


async def test_a_socket_that_does_not_speak_vscode_counts_all_its_traffic(
        stack: Stack) -> None:
    """A custom image (the echo image) under gateway.activity = "input": every message
    counts, as with "traffic", even small binary ones that look like keep-alives."""
    await stack.add("echo", now=LONG_AGO)
    ws_url = stack.url("/w/echo/_echo/ws").replace("http://", "ws://")
    marks = record_marks(stack)
    async with client() as http, http.ws_connect(ws_url, headers=stack.headers()) as ws:
        await asyncio.sleep(MARK_EVERY * 1.2)
        await ws.send_str("beat 0")
        assert (await ws.receive_str()) == "beat 0"
        before = len(marks)
        await send_due(ws, message(idle.KEEP_ALIVE))
        assert len(marks) > before

        async def flushed() -> bool:
            row = await stack.store.get("echo")
            return row is not None and row.last_access_at > LONG_AGO + timedelta(hours=1)

        await wait_for(flushed)


async def test_with_activity_traffic_every_message_counts(
        database_url: str, echo_upstream: Upstream, tmp_path: Path) -> None:
    async for stack in open_stack(database_url, echo_upstream, tmp_path, activity="traffic"):
        await stack.add("echo", now=LONG_AGO)
        ws_url = stack.url("/w/echo/_echo/ws").replace("http://", "ws://")
        marks = record_marks(stack)
        async with client() as http, http.ws_connect(ws_url, headers=stack.headers()) as ws:
            await send_due(ws, message(idle.CONTROL, AUTH))
            before = len(marks)
            await send_due(ws, message(idle.KEEP_ALIVE))
            assert len(marks) > before


# --- the presence endpoint ----------------------------------------------------------------

async def test_a_report_from_a_running_workspace_marks_it_and_says_how_often(
        stack: Stack) -> None:
    await stack.add("echo", now=LONG_AGO)
    await stack.store.set_ttls("echo", warm_ttl_seconds=40, cold_ttl_seconds=None)
    marks = record_marks(stack)
    async with client() as http, http.post(
            stack.url("/w/echo/_codehub/activity"), data=b"{}",
            headers=stack.headers(**{"Content-Type": "application/json",
                                     "Origin": stack.base})) as resp:
        assert resp.status == 200
        assert await resp.json() == {"running": True, "every": 10}  # a quarter of 40 s
    assert marks == ["echo"]


async def test_a_report_from_a_stepped_down_workspace_wakes_it(stack: Stack) -> None:
    await stack.add("sleepy", status=Status.WARM, desired=DesiredState.WARM)
    async with client() as http, http.post(
            stack.url("/w/sleepy/_codehub/activity"), data=b"{}",
            headers=stack.headers("sleepy", Origin=stack.base)) as resp:
        assert resp.status == 200
        assert await resp.json() == {"running": False}
    row = await stack.store.get("sleepy")
    assert row is not None and row.desired_state is DesiredState.RUNNING


async def test_a_report_needs_the_cookie_and_the_workspace_origin(stack: Stack) -> None:
    await stack.add("echo")
    async with client() as http:
        async with http.post(stack.url("/w/echo/_codehub/activity"), data=b"{}") as resp:
            assert resp.status == 401
        async with http.post(stack.url("/w/echo/_codehub/activity"), data=b"{}",
                             headers=stack.headers(Origin="http://evil.example")) as resp:
            assert resp.status == 403


async def test_the_script_is_served_and_only_the_root_document_is_looked_at(
        stack: Stack) -> None:
    await stack.add("echo")
    async with client() as http:
        async with http.get(stack.url("/w/echo/_codehub/presence.js"),
                            headers=stack.headers()) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/javascript"
            assert "activity" in await resp.text()
        # The echo image's root is JSON, not a workbench: passed on unchanged, and asked
        # for without Accept-Encoding (the answer must come uncompressed to be read).
        async with http.get(stack.url("/w/echo/?folder=/home"), headers=stack.headers(
                **{"Sec-Fetch-Dest": "document", "Accept-Encoding": "gzip"})) as resp:
            assert resp.status == 200
            seen = await resp.json()
        names = [name.lower() for name, _ in seen["headers"]]
        assert "accept-encoding" not in names and seen["raw_path"] == "/?folder=/home"
        # Any other request goes as before.
        async with http.get(stack.url("/w/echo/"), headers=stack.headers(
                **{"Accept-Encoding": "gzip"})) as resp:
            seen = await resp.json()
        assert "accept-encoding" in [name.lower() for name, _ in seen["headers"]]


def test_the_script_goes_right_after_head() -> None:
    page = b"<!DOCTYPE html>\n<html>\n\t<head>\n\t\t<script>x()</script></head><body></body>"
    out = presence._insert(page, presence.SCRIPT_SRC)
    assert out == page.replace(
        b"<head>", b'<head><script src="./_codehub/presence.js"></script>', 1)
    assert presence._insert(b"<html>no head</html>", presence.SCRIPT_SRC) == (
        b"<html>no head</html>")


# --- the metric ------------------------------------------------------------------------

async def test_a_step_down_under_an_open_tab_is_counted_once(stack: Stack) -> None:
    await stack.add("echo", now=LONG_AGO)
    await stack.add("closed", now=LONG_AGO)
    before = STEPPED_DOWN_UNDER_OPEN_TAB._value.get()
    ws_url = stack.url("/w/echo/_echo/ws").replace("http://", "ws://")
    async with client() as http, http.ws_connect(ws_url, headers=stack.headers()):
        # the sweep as the leader runs it: idle rows asked to step down, then hinted
        stepped = await stack.store.sweep_warm(datetime.now(UTC), default_ttl_seconds=60)
        assert sorted(stepped) == ["closed", "echo"]
        for wid in stepped:
            await stack.hints.publish(wid)
        await wait_for(lambda: STEPPED_DOWN_UNDER_OPEN_TAB._value.get() == before + 1)
        await stack.gw._close_revoked("echo")  # what another hint of it would run
        assert STEPPED_DOWN_UNDER_OPEN_TAB._value.get() == before + 1


async def test_a_stepped_down_workspaces_websocket_gets_503_and_wakes_nothing(
        stack: Stack) -> None:
    """The workbench's reconnection attempts are not a person: they do not wake it."""
    await stack.add("sleepy", status=Status.WARM, desired=DesiredState.WARM)
    ws_url = stack.url("/w/sleepy/_echo/ws").replace("http://", "ws://")
    async with client() as http:
        for _ in range(3):
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect(ws_url, headers=stack.headers("sleepy"))
            assert err.value.status == 503
    row = await stack.store.get("sleepy")
    assert row is not None and row.desired_state is DesiredState.WARM
