"""HTTP/1.1 connections to workspaces: a keep-alive pool and a streaming response reader.

Why not aiohttp's ClientSession for plain HTTP: measured side by side on this code path
(bench/proxy.py), its per-request bookkeeping (ClientRequest/ClientResponse objects,
header merging, timers, traces) costs about 150 us of CPU per proxied request; this
module, on llhttp (httptools), costs about 25 us. WebSockets still use aiohttp's client
(websocket.py): per-message cost there is in the frame codec, not in request set-up.

Guarantees:
- A connection is reused only after a response that was read completely, that allowed
  keep-alive, whose request was sent completely (`forbid_reuse` otherwise), and that was
  not a HEAD (llhttp cannot be told a response has no body). Anything else closes it.
- An idle connection is never reused after `idle_timeout` seconds (set below the
  workspace's own keep-alive timeout), nor after the workspace closed it.
- Response bodies are streamed: at most about `HIGH_WATER` bytes are buffered per
  connection; beyond that the socket stops being read until the consumer catches up.
- Nothing here imposes a read timeout: a long response (SSE, long poll, a big download)
  runs as long as both ends keep the connection open.
- A connection that dies mid-response raises `UpstreamError` to the reader; a response
  without Content-Length or chunked framing ends at the connection's end, as HTTP says.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

import httptools

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class UpstreamError(Exception):
    """The workspace could not be reached, or broke the connection mid-response."""

    def __init__(self, message: str, *, no_response: bool = False) -> None:
        super().__init__(message)
        # True when not a byte of a response arrived: a safe (bodiless, idempotent) request
        # that failed so on a reused connection may be retried on a new one.
        self.no_response = no_response


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to a workspace, carrying one request/response at a time."""

    __slots__ = (
        "_chunks", "_drain_waiter", "_framed", "_informational", "_paused_reading",
        "_paused_writing", "_reuse", "_waiter", "buffered", "closed", "complete",
        "connection", "error", "head_only", "headers", "headers_done", "idle_since",
        "keep_alive", "key", "parser", "pool", "received", "status", "transport",
    )

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._paused_writing = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._reset(False)

    def _reset(self, head_only: bool) -> None:
        self.head_only = head_only
        self._reuse = True
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.connection: bytes | None = None  # the response's Connection header
        self.complete = False
        self.keep_alive = False
        self.received = False
        self.error: UpstreamError | None = None
        self._framed = False
        self._informational = False
        self._chunks.clear()
        self.buffered = 0
        self._paused_reading = False
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.complete and self.head_only:
            return  # the bytes after a HEAD response's head: the connection is discarded
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"bad response from workspace: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.headers_done and self._waiter is not None:
            self._fail(UpstreamError("workspace closed the connection before responding",
                                     no_response=not self.received))
        elif self.headers_done and not self.complete:
            if self._framed:
                self._fail(UpstreamError("workspace closed the connection mid-response"))
            else:
                self.complete = True  # a body delimited by the connection's end
                self._wake()
        self._wake_drain()
        self.pool._forget(self)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._wake_drain()

    # --- llhttp callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._informational = True  # 1xx (e.g. 103): dropped, the real response follows
            self.headers = []
            return
        self.status = status
        self.headers_done = True
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length" or (
                    lname == b"transfer-encoding" and b"chunked" in value.lower()):
                self._framed = True
            elif lname == b"connection":
                self.connection = value
        if self.head_only:
            self.complete = True
            self.keep_alive = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._paused_reading and self.transport:
            self._paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self.complete:
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # --- the consumer's side ---------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(error)

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def begin(self, head: bytes, *, head_only: bool) -> None:
        """Send a request head; the body (if any) follows through `write`."""
        self._reset(head_only)
        assert self.transport is not None
        self.transport.write(head)

    def forbid_reuse(self) -> None:
        """The request was not sent whole: never put this connection back in the pool."""
        self._reuse = False

    @property
    def reusable(self) -> bool:
        return (self._reuse and self.complete and self.keep_alive and not self.closed
                and not self.head_only and not self.buffered)

    @property
    def exhausted(self) -> bool:
        """The whole response is in hand and its body taken: the connection has nothing
        more to give this exchange."""
        return self.complete and not self._chunks

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise UpstreamError("workspace closed the connection while receiving the body")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the socket accepts more (backpressure towards the request body)."""
        if self._paused_writing and not self.closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
        if self.closed and self.error is not None and not self.headers_done:
            raise self.error

    async def read_head(self) -> None:
        """Wait for the response's status and headers (or raise UpstreamError)."""
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            if self.closed:
                raise UpstreamError("workspace closed the connection before responding",
                                    no_response=not self.received)
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def take_buffered(self) -> bytes:
        """Everything received of the body so far (the whole body once `complete`)."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        self._maybe_resume()
        return data

    async def read_chunk(self) -> bytes:
        """The next piece of the body; b"" at its end. Raises UpstreamError if cut short."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft()
                self.buffered -= len(data)
                self._maybe_resume()
                return data
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            if self.closed:
                raise UpstreamError("workspace closed the connection mid-response")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def _maybe_resume(self) -> None:
        if self._paused_reading and self.buffered < LOW_WATER and self.transport:
            self._paused_reading = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class UpstreamPool:
    """Keep-alive connections to workspaces, keyed by (host, port). Most recently used
    connections are reused first, so the least used ones age out."""

    def __init__(self, *, connect_timeout: float, idle_timeout: float, max_idle: int,
                 kick: Callable[[], None]) -> None:
        self.connect_timeout = connect_timeout
        # Called when a request goes out and when a connection comes back (BusyPoll.kick):
        # the loop polls a moment for the workspace's answer and the browser's next request.
        self._kick = kick
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self._busy: set[UpstreamConnection] = set()

    async def acquire(self, host: str, port: int) -> tuple[UpstreamConnection, bool]:
        """A connection to (host, port) and whether it was reused (it may then turn out
        to have been closed by the workspace a moment ago: see UpstreamError.no_response)."""
        self._kick()
        key = (host, port)
        idle = self._idle.get(key)
        if idle:
            deadline = time.monotonic() - self.idle_timeout
            while idle:
                conn = idle.pop()
                if conn.idle_since > deadline and not conn.closed:
                    self._busy.add(conn)
                    return conn, True
                conn.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: UpstreamConnection(self, key), host, port)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to the workspace at {host}:{port}: "
                                f"{exc or type(exc).__name__}", no_response=True) from None
        self._busy.add(proto)
        return proto, False

    def release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        """Give a connection back: kept idle if `reusable` and healthy, else closed."""
        self._kick()
        self._busy.discard(conn)
        if reusable and conn.reusable:
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < self.max_idle:
                conn.idle_since = time.monotonic()
                idle.append(conn)
                return
        conn.close()

    def _forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.key]

    def prune(self) -> None:
        """Close connections idle for longer than idle_timeout (housekeeping)."""
        deadline = time.monotonic() - self.idle_timeout
        for key in list(self._idle):
            for conn in [c for c in self._idle.get(key, ()) if c.idle_since <= deadline]:
                conn.close()  # connection_lost removes it from the list

    def drop(self, host: str, port: int) -> None:
        """Close the idle connections to one workspace (its route changed)."""
        for conn in self._idle.pop((host, port), []):
            conn.close()

    def close(self) -> None:
        for conns in list(self._idle.values()):
            for conn in list(conns):
                conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn.close()
        self._busy.clear()

    def stats(self) -> tuple[int, int]:
        """(idle, busy) connection counts: for tests and metrics."""
        return sum(len(v) for v in self._idle.values()), len(self._busy)
