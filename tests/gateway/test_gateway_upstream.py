"""The upstream pool's connection-reuse guarantees (codehub/gateway/upstream.py), against
small loopback servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
from gateway_support import ECHO_ID, Stack, client

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def serve(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def point_route_at(stack: Stack, port: int) -> None:
    await stack.add()
    route = await stack.gw.routes.get(ECHO_ID)
    route.host, route.port = "127.0.0.1", port


async def test_a_reused_connection_closed_by_the_workspace_is_retried_once(
        stack: Stack) -> None:
    connections = 0
    answered: list[int] = []

    async def close_on_second_request(reader: asyncio.StreamReader,
                                      writer: asyncio.StreamWriter) -> None:
        # The first connection answers one request with keep-alive, then takes the next
        # request's head and closes without a byte: the race of a workspace whose
        # keep-alive timeout fires just as the gateway reuses the connection, made certain.
        # Every later connection answers whatever comes.
        nonlocal connections
        connections += 1
        number = connections
        try:
            while True:
                await read_head(reader)
                if number == 1 and answered.count(1) == 1:
                    return
                answered.append(number)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except asyncio.IncompleteReadError:
            return
        finally:
            writer.close()

    server, port = await serve(close_on_second_request)
    async with server:
        await point_route_at(stack, port)
        async with client() as http:
            for _ in range(2):
                async with http.get(stack.url("/w/echo/"), headers=stack.headers()) as resp:
                    assert resp.status == 200
                    assert await resp.read() == b"ok"
    # the second request went out on the pooled connection, met the close, and was sent
    # once more on a new connection
    assert answered == [1, 2] and connections == 2


async def test_a_request_with_a_body_is_never_retried(stack: Stack) -> None:
    connections = 0

    async def close_on_second_request(reader: asyncio.StreamReader,
                                      writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            head = await read_head(reader)
            await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r")[0]))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await read_head(reader)  # the next one is dropped unanswered
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server, port = await serve(close_on_second_request)
    async with server:
        await point_route_at(stack, port)
        async with client(timeout=aiohttp.ClientTimeout(total=30)) as http:
            async with http.post(stack.url("/w/echo/"), data=b"first",
                                 headers=stack.headers()) as resp:
                assert resp.status == 200
            async with http.post(stack.url("/w/echo/"), data=b"second",
                                 headers=stack.headers()) as resp:
                assert resp.status == 502  # not replayed: a body may not be sent twice
    assert connections == 1


async def test_a_body_ended_by_the_connection_close_is_delivered_whole(stack: Stack) -> None:
    async def unframed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for i in range(100):
            writer.write(b"%04d" % i * 256)
            await writer.drain()
        writer.close()

    server, port = await serve(unframed)
    async with server:
        await point_route_at(stack, port)
        async with client() as http, http.get(stack.url("/w/echo/"),
                                              headers=stack.headers()) as resp:
            body = await resp.read()
    assert body == b"".join(b"%04d" % i * 256 for i in range(100))
    assert stack.gw.pool.stats() == (0, 0)  # never pooled: it ended with the connection


async def test_an_early_answer_to_an_upload_is_relayed_and_the_connection_dropped(
        stack: Stack) -> None:
    async def refuse_upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            ) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()

    server, port = await serve(refuse_upload)
    async with server:
        await point_route_at(stack, port)
        async with client() as http, http.post(stack.url("/w/echo/"), data=b"x" * (8 << 20),
                                               headers=stack.headers()) as resp:
            assert resp.status == 413
            assert await resp.read() == b"big"
    await asyncio.sleep(0.3)
    assert stack.gw.pool.stats()[0] == 0  # not reused after a half-sent request
