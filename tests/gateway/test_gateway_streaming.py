"""Bodies stream through the gateway (codehub/gateway/proxy.py, upstream.py): the first
bytes arrive before the last ones were sent, both ways, and a client that stops reading
stops the workspace within a bounded window. Each test is a handshake a buffering proxy
cannot complete: the sender waits for proof that its first bytes arrived before it sends
the rest, so it deadlocks (and times out) unless the gateway forwards as it receives.
Also: an unknown workspace with a valid cookie answers 404."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway_support import ECHO_ID, Stack, client

FIRST = 64 * 1024
REST = 4 * 1024 * 1024
HANDSHAKE = 20.0  # seconds: generous on a loaded machine; a deadlock never completes


async def point_route_at(stack: Stack, port: int) -> None:
    await stack.add()
    route = await stack.gw.routes.get(ECHO_ID)
    route.host, route.port = "127.0.0.1", port


async def test_a_download_reaches_the_client_before_the_workspace_sent_all_of_it(
        stack: Stack) -> None:
    first_arrived = asyncio.Event()

    async def download(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (FIRST + REST))
        writer.write(b"a" * FIRST)
        await writer.drain()
        await first_arrived.wait()  # the rest only once the client holds the first part
        writer.write(b"b" * REST)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(download, "127.0.0.1", 0)
    async with server:
        await point_route_at(stack, server.sockets[0].getsockname()[1])
        async with asyncio.timeout(HANDSHAKE), client() as http, http.get(
                stack.url("/w/echo/"), headers=stack.headers()) as resp:
            assert resp.status == 200
            assert await resp.content.readexactly(FIRST) == b"a" * FIRST
            first_arrived.set()
            assert await resp.read() == b"b" * REST


async def test_an_upload_reaches_the_workspace_before_the_client_sent_all_of_it(
        stack: Stack) -> None:
    first_arrived = asyncio.Event()
    received = 0

    async def upload_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        tail = b""
        while not tail.endswith(b"0\r\n\r\n"):
            data = await reader.read(65536)
            if not data:
                return
            received += len(data)  # chunk framing included: a few bytes per chunk
            tail = (tail + data)[-5:]
            if received >= FIRST:
                first_arrived.set()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * FIRST
        await first_arrived.wait()  # the rest only once the workspace holds the first part
        yield b"b" * REST

    server = await asyncio.start_server(upload_sink, "127.0.0.1", 0)
    async with server:
        await point_route_at(stack, server.sockets[0].getsockname()[1])
        async with asyncio.timeout(HANDSHAKE), client() as http, http.post(
                stack.url("/w/echo/"), data=body(), headers=stack.headers()) as resp:
            assert resp.status == 200
            assert await resp.read() == b"ok"
    assert received > FIRST + REST


async def test_a_client_that_stops_reading_stops_the_workspace_within_a_bounded_window(
        stack: Stack) -> None:
    total = 256 * 1024 * 1024
    sent = 0
    progress = asyncio.Event()

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"x" * 65536
        try:
            while sent < total:
                writer.write(block)
                await writer.drain()
                sent += len(block)
                progress.set()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(firehose, "127.0.0.1", 0)
    async with server:
        await point_route_at(stack, server.sockets[0].getsockname()[1])
        async with client() as http, http.get(stack.url("/w/echo/"),
                                              headers=stack.headers()) as resp:
            assert resp.status == 200
            # Read nothing more; wait until the workspace's writes stall (no progress for
            # a full second), then look at how much it got rid of.
            while True:
                progress.clear()
                try:
                    async with asyncio.timeout(1.0):
                        await progress.wait()
                except TimeoutError:
                    break
                assert sent < total, "the whole body went out to a client reading nothing"
            print(f"workspace stalled after {sent / 2**20:.1f} MiB")
            # Socket buffers on both hops plus the gateway's own bounded buffer
            # (HIGH_WATER, 256 KiB): tens of MiB at most on loopback, never the body.
            assert sent < 64 * 1024 * 1024, f"{sent} bytes left the workspace unread"
            resp.close()


async def test_an_unknown_workspace_with_a_valid_cookie_is_404(stack: Stack) -> None:
    await stack.add()  # some other workspace exists; "ghost" never did
    async with client() as http:
        async with http.get(stack.url("/w/ghost/"), headers=stack.headers("ghost")) as resp:
            assert resp.status == 404
            assert "No such workspace" in await resp.text()
        # the same cookie machinery opens a workspace that exists
        async with http.get(stack.url("/w/echo/"), headers=stack.headers()) as resp:
            assert resp.status == 200
