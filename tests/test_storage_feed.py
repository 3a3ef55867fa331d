"""The one-time authenticated feed connection (codehub/backends/docker/feed.py) over real TCP on the
loopback: only the expected peer with the token gets the stream, and only once."""

from __future__ import annotations

import asyncio
import socket

import pytest

from codehub.backends.docker.feed import FeedListener
from codehub.interfaces import AdapterError

HOST = "127.0.0.1"


async def _peer(address: str = HOST) -> str:
    return address


async def _connect(port: int, line: bytes, source: str = HOST
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    writer.write(line)
    await writer.drain()
    return reader, writer


async def _closed_without_a_byte(reader: asyncio.StreamReader) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), 5)
    except ConnectionResetError:
        return True
    return data == b""


async def test_only_the_expected_peer_with_the_token_gets_the_stream_and_only_once() -> None:
    never: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    async with FeedListener(HOST, _peer) as listener:
        accepting = asyncio.create_task(listener.accept(never, timeout=30))
        wrong_token, _ = await _connect(listener.port, b"0" * 64 + b"\n")
        assert await _closed_without_a_byte(wrong_token)
        other_peer, _ = await _connect(listener.port, listener.token.encode() + b"\n",
                                       source="127.0.0.2")
        assert await _closed_without_a_byte(other_peer)
        assert not accepting.done()  # still listening for the right one

        reader, writer = await _connect(listener.port, listener.token.encode() + b"\n")
        conn = await asyncio.wait_for(accepting, 10)
        await conn.send(b"the stream")
        await conn.finish()
        assert await reader.read() == b"the stream"
        writer.close()
        with pytest.raises(OSError):  # nobody else can connect any more
            await _connect(listener.port, listener.token.encode() + b"\n")
    never.cancel()


async def test_abort_resets_the_connection_so_the_reader_never_sees_an_end_of_stream() -> None:
    never: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    async with FeedListener(HOST, _peer) as listener:
        accepting = asyncio.create_task(listener.accept(never, timeout=30))
        reader, _ = await _connect(listener.port, listener.token.encode() + b"\n")
        conn = await accepting
        await conn.send(b"partial")
        await asyncio.sleep(0.1)
        conn.abort()
        assert await reader.readexactly(7) == b"partial"
        with pytest.raises(ConnectionResetError):
            await reader.read()
    never.cancel()


async def test_accept_fails_when_the_helper_finishes_first_or_never_connects() -> None:
    async with FeedListener(HOST, _peer) as listener:
        finished: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        finished.set_result({"StatusCode": 111})
        with pytest.raises(AdapterError, match="finished before it connected"):
            await listener.accept(finished, timeout=5)
    async with FeedListener(HOST, _peer) as listener:
        failed: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        failed.set_exception(RuntimeError("engine gone"))
        with pytest.raises(RuntimeError, match="engine gone"):
            await listener.accept(failed, timeout=5)
    async with FeedListener(HOST, _peer) as listener:
        never: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        with pytest.raises(AdapterError, match=r"within 0\.2s"):
            await listener.accept(never, timeout=0.2)
        never.cancel()


async def test_listening_on_an_address_this_host_does_not_have_is_a_clear_error() -> None:
    # TEST-NET-1 is never assigned to a local interface
    with socket.socket() as probe, pytest.raises(OSError):
        probe.bind(("192.0.2.1", 0))
    with pytest.raises(AdapterError, match=r"cannot listen on 192\.0\.2\.1"):
        async with FeedListener("192.0.2.1", _peer):
            pass
