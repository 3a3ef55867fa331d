"""The WebSocket byte tunnel (codehub/gateway/tunnel.py) through a real gateway to the echo
workspace image (real Docker): bounded memory whatever the message size, idle sockets
cheap, half-close, close codes both ways, subprotocols and extensions. The browser side
is a raw socket writing its own frames, so nothing here holds a whole message either."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import json
import os
import resource
import struct
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator

import aiohttp
from gateway_support import Stack, client, wait_for

from codehub.gateway.websocket import accept_key

WS_PATH = "/w/echo/_echo/ws"
MiB = 1024 * 1024


class Raw:
    """A browser speaking RFC 6455 on a raw connection through the gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 head: dict[str, str]) -> None:
        self.reader, self.writer, self.head = reader, writer, head

    def send(self, opcode: int, payload: bytes, *, fin: bool = True,
             mask: bytes = b"\0\0\0\0") -> None:
        """One masked frame. The zero key is a valid key (the tunnel never looks) and keeps
        a 1 GiB message from costing the test seconds of XOR."""
        n = len(payload)
        b0 = (0x80 if fin else 0) | opcode
        if n < 126:
            head = struct.pack("!BB", b0, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", b0, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", b0, 0x80 | 127, n)
        if mask != b"\0\0\0\0":
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask)
        self.writer.write(payload)

    async def frame_head(self) -> tuple[bool, int, int]:
        b0, b1 = await self.reader.readexactly(2)
        assert not b1 & 0x80, "server frames are not masked"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return bool(b0 & 0x80), b0 & 0x0F, n

    async def frame(self) -> tuple[int, bytes]:
        _fin, opcode, n = await self.frame_head()
        return opcode, await self.reader.readexactly(n)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def raw_connect(stack: Stack, protocols: str | None = None,
                      extensions: str | None = None) -> Raw:
    host, port = stack.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=4 * MiB)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {WS_PATH} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             f"Cookie: {stack.cookie()}"]
    if protocols:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    if extensions:
        lines.append(f"Sec-WebSocket-Extensions: {extensions}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    raw_head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status, *rest = raw_head.strip().split("\r\n")
    assert status.startswith("HTTP/1.1 101"), raw_head
    head = {}
    for line in rest:
        name, _, value = line.partition(":")
        head[name.strip().lower()] = value.strip()
    assert head["sec-websocket-accept"] == accept_key(key)
    return Raw(reader, writer, head)


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PeakRss:
    """Samples this process's RSS every 20 ms while the block runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss())
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.ensure_future(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.peak = max(self.peak, rss())


def chunks(total: int, size: int) -> list[int]:
    return [min(size, total - i) for i in range(0, total, size)]


async def test_a_1_gib_message_each_way_grows_the_gateway_by_at_most_64_mib(
        stack: Stack) -> None:
    """The gateway runs in this process; the browser here writes a 1 GiB binary message as
    1 MiB fragments and reads the echo back frame by frame (the echo image assembles it
    and answers it as one 1 GiB frame): only the tunnel could hold the message."""
    await stack.add()
    ws = await raw_connect(stack)  # warm-up: lazily created state counts in the baseline
    ws.send(0x1, b"warm")
    assert await ws.frame() == (0x1, b"warm")
    await ws.close()
    gc.collect()
    await asyncio.sleep(0.5)
    base = rss()
    block = os.urandom(MiB)
    total = 1024 * MiB
    sent, got = hashlib.md5(), hashlib.md5()  # a checksum
    ws = await raw_connect(stack)
    async with PeakRss() as peak:
        async def write() -> None:
            parts = chunks(total, MiB)
            for i, n in enumerate(parts):
                piece = block[:n] if i % 2 == 0 else block[n - 1::-1]
                sent.update(piece)
                ws.send(0x2 if i == 0 else 0x0, piece, fin=i == len(parts) - 1)
                await ws.writer.drain()

        async def read() -> int:
            fin, opcode, n = await ws.frame_head()
            assert (fin, opcode) == (True, 0x2)
            left = n
            while left:
                piece = await ws.reader.read(min(left, MiB))
                assert piece, "the connection ended inside the message"
                got.update(piece)
                left -= len(piece)
            return n

        _, n = await asyncio.wait_for(asyncio.gather(write(), read()), timeout=300)
    ws.send(0x8, struct.pack("!H", 1000))
    assert await ws.frame() == (0x8, struct.pack("!H", 1000))
    await ws.close()
    grown = peak.peak - base
    print(f"1 GiB each way: peak RSS growth {grown / MiB:.1f} MiB")
    assert n == total
    assert got.hexdigest() == sent.hexdigest()
    assert grown <= 64 * MiB, f"{grown / MiB:.1f} MiB"


_HOLDER = textwrap.dedent("""
    import asyncio, base64, os, resource, sys
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, port, cookie, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    async def one():
        r, w = await asyncio.open_connection(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        w.write((f"GET /w/echo/_echo/ws HTTP/1.1\\r\\nHost: {host}:{port}\\r\\n"
                 f"Upgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
                 f"Sec-WebSocket-Key: {key}\\r\\nSec-WebSocket-Version: 13\\r\\n"
                 f"Cookie: {cookie}\\r\\n\\r\\n").encode())
        head = await r.readuntil(b"\\r\\n\\r\\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return r, w
    async def main():
        held = []
        for i in range(0, n, 100):
            held += await asyncio.gather(*(one() for _ in range(min(100, n - i))))
        print("open", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        r, w = held[-1]
        w.write(b"\\x81\\x84\\0\\0\\0\\0ping")  # the last one still relays
        await w.drain()
        assert await r.readexactly(6) == b"\\x81\\x04ping"
        print("ok", flush=True)
    asyncio.run(main())
""")


async def _lines(proc: asyncio.subprocess.Process) -> AsyncIterator[str]:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        yield line.decode().strip()


async def test_idle_relayed_sockets_cost_at_most_32_kib_each(stack: Stack) -> None:
    """As many idle sockets as the descriptor hard limit allows (two per relayed socket in
    the gateway's process: 10,000 needs a hard limit above 20,000), held by a child process,
    to the echo image; the RSS growth of this (the gateway's) process per socket."""
    await stack.add()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = min(10_000, (hard - 400) // 2)
    # one client, one workspace: lift the WebSocket limits (this measures memory)
    stack.gw.ws_slots.per_workspace = stack.gw.ws_slots.per_client = n + 100
    host, port = stack.base.removeprefix("http://").split(":")
    for _ in range(20):  # warm-up
        ws = await raw_connect(stack)
        await ws.close()
    await wait_for(lambda: not stack.gw.activity.sockets)
    gc.collect()
    await asyncio.sleep(0.5)
    base = rss()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, host, port, stack.cookie(), str(n),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        lines = _lines(proc)
        assert await asyncio.wait_for(anext(lines), timeout=240) == "open"
        await wait_for(lambda: sum(stack.gw.activity.sockets.values()) >= n, timeout=60)
        await asyncio.sleep(2)
        grown = rss() - base
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        assert await asyncio.wait_for(anext(lines), timeout=30) == "ok"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    per = grown / n
    print(f"{n} idle sockets: {per / 1024:.1f} KiB each")
    assert per <= 32 * 1024, f"{per / 1024:.1f} KiB per socket"
    await wait_for(lambda: not stack.gw.activity.sockets, timeout=60)


async def test_half_close_from_the_browser_still_delivers_the_workspace_answer(
        stack: Stack) -> None:
    await stack.add()
    ws = await raw_connect(stack)
    ws.send(0x1, b"last words", mask=b"\x12\x34\x56\x78")
    ws.writer.write_eof()  # the browser is done sending; it still reads
    assert await ws.frame() == (0x1, b"last words")
    # A browser's EOF without a close frame: the workspace is told 1011 in its name (the
    # echo image answers with the same code), and the browser reads that, then EOF.
    assert await ws.frame() == (0x8, struct.pack("!H", 1011))
    assert await ws.reader.read() == b""
    await ws.close()
    await wait_for(lambda: not stack.gw.activity.sockets)


async def test_close_codes_travel_unchanged_both_ways(stack: Stack) -> None:
    await stack.add()
    for code, reason in ((1000, b""), (4000, b"see you"), (1011, b"oops")):
        ws = await raw_connect(stack)
        ws.send(0x8, struct.pack("!H", code) + reason, mask=b"\xa1\xb2\xc3\xd4")
        assert await ws.frame() == (0x8, struct.pack("!H", code) + reason)
        assert await ws.reader.read() == b""  # the workspace closed after its answer
        await ws.close()
    async with client() as http:
        for code in (1000, 4000):
            async with http.ws_connect(stack.url(WS_PATH).replace("http", "ws"),
                                       headers=stack.headers()) as sock:
                await sock.send_str(f"close:{code}")
                msg = await sock.receive(timeout=10)
                assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, code, "bye")
    await wait_for(lambda: not stack.gw.activity.sockets)


async def test_subprotocol_is_the_workspace_choice_and_no_extension_is_negotiated(
        stack: Stack) -> None:
    await stack.add()
    ws = await raw_connect(stack, protocols="vscode.v1, other",
                           extensions="permessage-deflate; client_max_window_bits")
    assert ws.head.get("sec-websocket-protocol") == "vscode.v1"
    assert "sec-websocket-extensions" not in ws.head
    ws.send(0x1, b"headers")
    opcode, body = await ws.frame()
    assert opcode == 0x1
    seen = {k.lower(): v for k, v in json.loads(body)}
    assert seen["sec-websocket-protocol"] == "vscode.v1, other"
    assert "sec-websocket-extensions" not in seen
    await ws.close()
    ws = await raw_connect(stack)  # nothing offered: nothing answered
    assert "sec-websocket-protocol" not in ws.head
    await ws.close()
    async with client() as http, http.ws_connect(  # aiohttp offers deflate by default
            stack.url(WS_PATH).replace("http", "ws"), headers=stack.headers()) as sock:
        assert sock.compress == 0
        await sock.send_str("plain")
        assert (await sock.receive(timeout=10)).data == "plain"


async def test_an_upgrade_without_a_valid_key_is_refused_with_400(stack: Stack) -> None:
    await stack.add()
    async with client() as http, http.get(stack.url(WS_PATH), headers={
            **stack.headers(), "Upgrade": "websocket", "Connection": "Upgrade",
            "Sec-WebSocket-Key": "not-base64!", "Sec-WebSocket-Version": "13"}) as resp:
        assert resp.status == 400


async def test_a_vanished_workspace_is_a_1011_close_frame_unmasked_then_eof(
        stack: Stack) -> None:
    from codehub.gateway.tunnel import Tunnel

    await stack.add()
    ws = await raw_connect(stack)
    ws.send(0x1, b"x")
    assert await ws.frame() == (0x1, b"x")
    for tunnel in [o for o in gc.get_objects() if isinstance(o, Tunnel)]:
        if tunnel.upstream.transport is not None:
            tunnel.upstream.transport.abort()  # gone without a close frame
    assert await ws.frame() == (0x8, struct.pack("!H", 1011))  # frame() checks: unmasked
    assert await ws.reader.read() == b""
    await ws.close()
    await wait_for(lambda: not stack.gw.activity.sockets)
