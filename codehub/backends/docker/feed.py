"""A one-time, authenticated TCP connection that hands a byte stream to one helper container.

Guarantees:
- `FeedListener` listens on one given address (this process's address on a network that only
  our helper containers join) and a port the kernel picks, with a fresh 256-bit token.
- `accept()` returns the first connection whose peer address is the one `expected_peer()`
  names (asked when it arrives) and whose first line is the token (compared in constant
  time). Every other connection is closed at once, without a byte sent; the listener
  stays open until the right one arrives, `until` finishes, or `timeout` passes
  (AdapterError, or whatever `until` raised).
- Listening stops as soon as the connection is accepted, and on leaving the `async with`:
  one stream, one reader.
- `FeedConnection.abort()` resets the connection (RST, never FIN): the reader sees an error,
  never what could pass for the end of the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from ...interfaces import AdapterError

HANDSHAKE_TIMEOUT = 10.0  # seconds a connection gets to send the token line
WRITE_BUFFER = 4 * 1024 * 1024  # bytes queued in the transport before drain() waits
UNACKED_TIMEOUT = 120.0  # seconds sent data may stay unacknowledged before the send fails


class ListenError(AdapterError):
    """This process cannot listen on the address given (it is not one of its own)."""


class FeedConnection:
    """The accepted connection: write the stream, then `finish()`, or `abort()`."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER)
        sock = writer.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            # A reader that vanished without a reset (its network namespace went with it)
            # fails the connection after this long instead of after TCP's ~15 minutes.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                int(UNACKED_TIMEOUT * 1000))

    async def send(self, data: bytes | memoryview) -> None:
        """OSError (the reader went away) when the data cannot be delivered."""
        self._writer.write(data)
        await self._writer.drain()

    async def finish(self) -> None:
        """Flush and close normally (FIN): the reader sees the end of the stream."""
        await self._writer.drain()
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    def abort(self) -> None:
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.transport.abort()


class FeedListener:
    """`async with FeedListener(host, expected_peer) as listener:`, then hand `port` and
    `token` to the helper and `await listener.accept(...)`."""

    def __init__(self, host: str, expected_peer: Callable[[], Awaitable[str]]) -> None:
        """`expected_peer()` names the only address the connection may come from; it is
        asked when a connection arrives (so it may name a container not yet started)."""
        self.host = host
        self._expected_peer = expected_peer
        self.port = 0
        self.token = secrets.token_hex(32)
        self._server: asyncio.Server | None = None
        self._accepted: asyncio.Future[asyncio.StreamWriter] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._accepted = asyncio.get_running_loop().create_future()
        try:
            self._server = await asyncio.start_server(self._on_connect, self.host, 0,
                                                      backlog=8, reuse_address=True)
        except OSError as exc:
            raise ListenError(f"cannot listen on {self.host} for a helper's connection: "
                               f"{exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop_listening()
        for task in list(self._handshakes):
            task.cancel()
        if self._handshakes:
            await asyncio.wait(self._handshakes)
        assert self._accepted is not None
        if not self._accepted.done():
            self._accepted.cancel()
        elif exc is not None and not self._accepted.cancelled() and \
                self._accepted.exception() is None:
            self._accepted.result().transport.abort()  # the caller never took it over

    async def accept(self, until: asyncio.Future[Any], timeout: float) -> FeedConnection:
        """The authenticated connection. Raises what `until` raised, or AdapterError when
        `until` finishes or `timeout` passes first."""
        assert self._accepted is not None
        done, _ = await asyncio.wait({self._accepted, until}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._accepted in done:
            self._stop_listening()
            return FeedConnection(self._accepted.result())
        if until in done:
            until.result()  # raises its failure, if any
            raise AdapterError("the helper finished before it connected")
        raise AdapterError(f"no helper connected to {self.host}:{self.port} within "
                           f"{timeout:g}s")

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._handshake(reader, writer))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        assert self._accepted is not None
        accepted = False
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                line = await reader.readline()
                peer = writer.get_extra_info("peername")
                expected = await self._expected_peer()
            token_ok = hmac.compare_digest(line.rstrip(b"\r\n"), self.token.encode())
            if token_ok and peer and peer[0] == expected and not self._accepted.done():
                self._accepted.set_result(writer)
                accepted = True
        except Exception:  # a slow, garbled or unknown peer (or an engine error): refused
            pass
        finally:
            if not accepted:
                writer.transport.abort()
