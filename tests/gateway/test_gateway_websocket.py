"""The WebSocket relay (a byte tunnel) against the echo workspace image (real Docker): the
guarantees of codehub/gateway/websocket.py, one test each."""

from __future__ import annotations

import asyncio
import gc
import json
import os

import aiohttp
from gateway_support import Stack, client, wait_for

from codehub.gateway.tunnel import Tunnel

WS_PATH = "/w/echo/_echo/ws"


def ws_url(stack: Stack, path: str = WS_PATH) -> str:
    return stack.url(path).replace("http://", "ws://")


async def test_text_and_binary_messages_are_relayed(stack: Stack) -> None:
    await stack.add()
    async with client() as http, http.ws_connect(ws_url(stack), headers=stack.headers()) as ws:
        await ws.send_str("hello ✓")
        assert (await ws.receive()).data == "hello ✓"
        await ws.send_bytes(b"\x00\x01\xff" * 100)
        msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == b"\x00\x01\xff" * 100


async def test_a_16_mib_message_is_relayed_whole(stack: Stack) -> None:
    await stack.add()
    payload = os.urandom(16 * 1024 * 1024)
    async with client() as http, http.ws_connect(ws_url(stack), headers=stack.headers(),
                                                 max_msg_size=0) as ws:
        await ws.send_bytes(payload)
        msg = await ws.receive(timeout=60)
        assert msg.type is aiohttp.WSMsgType.BINARY
        assert msg.data == payload


async def test_ping_and_pong_are_relayed(stack: Stack) -> None:
    await stack.add()
    async with client() as http, http.ws_connect(ws_url(stack), headers=stack.headers(),
                                                 autoping=False) as ws:
        await ws.ping(b"are-you-there")
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.PONG
        assert msg.data == b"are-you-there"


async def test_subprotocol_chosen_by_the_workspace_is_answered(stack: Stack) -> None:
    await stack.add()
    async with client() as http, http.ws_connect(ws_url(stack), headers=stack.headers(),
                                                 protocols=("vscode.v1", "other")) as ws:
        assert ws.protocol == "vscode.v1"


async def test_upgrade_headers_reach_the_workspace_without_the_gateway_cookie(
        stack: Stack) -> None:
    await stack.add()
    headers = stack.headers(Origin=stack.base)  # the workspace's own origin (path mode)
    headers["Cookie"] = f"theirs=1; {headers['Cookie']}; other=2"
    async with client() as http, http.ws_connect(ws_url(stack), headers=headers) as ws:
        await ws.send_str("headers")
        seen = json.loads((await ws.receive()).data)
    names = {k.lower(): v for k, v in seen}
    assert names["cookie"] == "theirs=1; other=2"
    assert names["origin"] == stack.base
    assert names["x-forwarded-prefix"] == "/w/echo"
    assert "sec-websocket-extensions" not in names  # no compression negotiated upstream


async def test_close_code_from_the_browser_reaches_the_workspace_and_back(
        stack: Stack) -> None:
    await stack.add()
    async with client() as http:
        ws = await http.ws_connect(ws_url(stack), headers=stack.headers())
        await ws.close(code=4001, message=b"client bye")
        # The echo image answers a close with the same code: it came through both ways.
        assert ws.close_code == 4001


async def test_close_code_from_the_workspace_reaches_the_browser(stack: Stack) -> None:
    await stack.add()
    async with client() as http, http.ws_connect(ws_url(stack), headers=stack.headers()) as ws:
        await ws.send_str("close:4002")
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 4002
        assert msg.extra == "bye"


async def test_200_concurrent_sockets_relay_and_leave_nothing_behind(stack: Stack) -> None:
    await stack.add()
    gw = stack.gw
    # Warm up once, so lazily created things (the session's connector) exist in the baseline.
    async with client() as http, http.ws_connect(ws_url(stack), headers=stack.headers()) as ws:
        await ws.send_str("warm")
        await ws.receive()
    await wait_for(lambda: not gw.activity.sockets)
    tasks_before = len(asyncio.all_tasks())
    fds_before = len(os.listdir("/proc/self/fd"))
    # 200 at once from one address is over the default per-client limit (100; its own test
    # below): lifted here, so that how many overlap does not decide the outcome.
    gw.ws_slots.per_client = gw.ws_slots.per_workspace = 1000

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        async with http.ws_connect(ws_url(stack), headers=stack.headers()) as ws:
            for j in range(3):
                await ws.send_str(f"{i}:{j}")
                assert (await ws.receive(timeout=30)).data == f"{i}:{j}"
            await ws.send_bytes(i.to_bytes(4, "big"))
            assert (await ws.receive(timeout=30)).data == i.to_bytes(4, "big")

    connector = aiohttp.TCPConnector(limit=0)
    async with client(connector=connector) as http:
        await asyncio.gather(*(one(http, i) for i in range(200)))
    await wait_for(lambda: not gw.activity.sockets, timeout=20)
    await wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before, timeout=20)
    await wait_for(lambda: len(os.listdir("/proc/self/fd")) <= fds_before + 2, timeout=20)


async def test_workspace_vanishing_closes_the_browser_socket_with_1011(stack: Stack) -> None:
    await stack.add()
    gw = stack.gw
    async with client() as http, http.ws_connect(ws_url(stack), headers=stack.headers()) as ws:
        await ws.send_str("x")
        await ws.receive()
        # Cut every upstream connection of the gateway's tunnels without a close frame.
        tunnels = [o for o in gc.get_objects() if isinstance(o, Tunnel)]
        assert tunnels
        for tunnel in tunnels:
            if tunnel.upstream.transport is not None:
                tunnel.upstream.transport.abort()
        msg = await ws.receive(timeout=10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1011
    await wait_for(lambda: not gw.activity.sockets)


async def test_upgrade_to_a_waking_workspace_is_refused_with_503(stack: Stack) -> None:
    from codehub.model import Status

    await stack.add(status=Status.WARM)
    async with client() as http:
        try:
            await http.ws_connect(ws_url(stack), headers=stack.headers())
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 503
        else:
            raise AssertionError("the upgrade was accepted")


async def test_websockets_over_the_per_workspace_or_per_client_limit_get_429_and_free_slots(
        stack: Stack) -> None:
    slots = stack.gw.ws_slots
    assert (slots.per_workspace, slots.per_client) == (
        stack.cfg.limits.websockets_per_workspace, stack.cfg.limits.websockets_per_client)
    slots.per_workspace, slots.per_client = 3, 2
    await stack.add()
    async with client() as http:
        held = [await http.ws_connect(ws_url(stack), headers=stack.headers()) for _ in range(2)]
        # a third from the same address: over the per-client limit, refused before the relay
        try:
            await http.ws_connect(ws_url(stack), headers=stack.headers())
            raise AssertionError("the upgrade over the per-client limit was accepted")
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 429
        # the relayed sockets are untouched
        await held[0].send_str("still here")
        assert (await held[0].receive(timeout=5)).data == "still here"
        # per workspace (every test client shares one address: widen the client limit)
        slots.per_client = 10
        held.append(await http.ws_connect(ws_url(stack), headers=stack.headers()))
        try:
            await http.ws_connect(ws_url(stack), headers=stack.headers())
            raise AssertionError("the upgrade over the per-workspace limit was accepted")
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 429
        # closing gives the slot back
        await held.pop().close()
        await wait_for(lambda: slots._workspaces.get("echo", 0) < 3, 5)
        held.append(await http.ws_connect(ws_url(stack), headers=stack.headers()))
        for ws in held:
            await ws.close()
    await wait_for(lambda: not slots._workspaces and not slots._clients, 5)
