"""The byte tunnel under a relayed WebSocket: two TCP connections joined after the upgrade.

Guarantees:
- Bytes are copied as they arrive, both ways, never parsed into frames or messages: a
  message of any size costs the gateway at most the write buffer's high-water mark
  (HIGH_WATER) plus one read (the event loop reads at most 256 KiB at a time) per
  direction. When the receiving side's write buffer passes HIGH_WATER, the sending side's
  reading is paused; it is resumed when the buffer has drained below LOW_WATER.
- EOF from one side is passed on as EOF (write_eof) to the other, which may keep sending
  (half-close); when both directions have ended, both connections are closed. After the
  first EOF the other direction is given HALF_CLOSE_WAIT, then both are dropped.
- A side whose byte stream ended (EOF or lost connection) without a WebSocket close frame
  as its last bytes has "vanished": the other side is sent a close frame the tunnel
  builds itself, code 1011 (server->client unmasked, client->server masked as RFC 6455
  requires), then EOF. So a browser that half-closes without a close frame is, for the
  workspace, gone with 1011 (the browser still reads until the workspace closes). A close
  frame that did pass through travels as bytes, so close codes and reasons reach the
  other side unchanged.
- `Tunnel.run` returns only when both connections are lost; cancelling it (revocation,
  shutdown) aborts both TCP connections. Closing is bounded: a connection that cannot
  flush its buffer within CLOSE_WAIT of being closed is aborted.
- Activity: a chunk read (either direction) that counts marks the workspace active, at
  most once per MARK_EVERY seconds per side (one clock read and compare per chunk; a
  chunk is looked at only when a mark is due). With `sort_activity` off
  (gateway.activity = "traffic") every chunk counts. With it on ("input"), the
  browser's first chunk decides: a socket that speaks VS Code's protocol counts only
  the chunks `idle.counts` says a person caused (not keep-alives, acks, small background
  messages); any other socket counts every chunk (the fallback for custom images).
  `Side.data_received` is the one per-chunk hook; it also calls `kick` (the gateway's
  BusyPoll: the loop polls a moment for the answer instead of sleeping).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import cast

from . import idle

HIGH_WATER = 512 * 1024
LOW_WATER = 128 * 1024
HALF_CLOSE_WAIT = 10.0
CLOSE_WAIT = 5.0
MARK_EVERY = 1.0
GOING_WRONG = 1011


def close_frame(code: int, *, masked: bool) -> bytes:
    """A close frame with a 2-byte code and no reason (RFC 6455 5.5.1)."""
    payload = code.to_bytes(2, "big")
    if not masked:
        return b"\x88\x02" + payload
    mask = os.urandom(4)
    return b"\x88\x82" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def ends_with_close_frame(tail: bytes, *, masked: bool) -> bool:
    """Whether `tail` (the last bytes one side sent) ends with a whole close frame. A close
    frame is the last frame a side sends and is at most 131 bytes; `tail` holds the last
    two reads, so one split across more reads is not seen (then the peer gets an extra
    1011 close frame after the real one, which it ignores)."""
    extra = 4 if masked else 0
    bit = 0x80 if masked else 0
    for length in range(126):
        start = len(tail) - length - 2 - extra
        if start < 0:
            return False
        if tail[start] != 0x88 or tail[start + 1] != length | bit or length == 1:
            continue
        if length == 0:
            return True
        mask = tail[start + 2:start + 6] if masked else b"\0\0\0\0"
        at = start + 2 + extra
        code = (tail[at] ^ mask[0]) << 8 | (tail[at + 1] ^ mask[1])
        if 1000 <= code <= 4999:
            return True
    return False


class Side(asyncio.Protocol):
    """One TCP connection of the tunnel; reads from it are written to `peer`."""

    __slots__ = ("buffer", "clock", "counts_all", "kick", "lost", "mark", "masked",
                 "next_mark", "on_lost", "peer", "prev", "read_done", "tail", "transport",
                 "tunnel", "waiter", "writing_paused")

    def __init__(self, tunnel: Tunnel, *, masked: bool) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.masked = masked  # this side's frames are masked (it is the browser)
        self.clock = tunnel.loop.time
        self.next_mark = 0.0
        self.mark = tunnel.mark
        self.kick = tunnel.kick
        self.counts_all = not tunnel.sort_activity  # every chunk marks (no need to look)
        self.tail = b""  # the last two reads: where a closing frame would be
        self.prev = b""
        self.read_done = False
        self.lost = False
        self.writing_paused = False
        self.on_lost: Callable[[BaseException | None], None] | None = None
        self.buffer: bytearray | None = None  # bytes read before the peer is wired
        self.waiter: asyncio.Future[None] | None = None  # woken by bytes read meanwhile

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(cast(asyncio.Transport, transport))  # uvloop's are not subclasses

    # -- reading ---------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:  # not joined yet (upstream bytes right after its 101)
            if self.buffer is None:
                self.buffer = bytearray()
            self.buffer += data
            self._wake()
            return
        if peer.transport is not None and not peer.lost:
            peer.transport.write(data)
        self.kick()  # the answer to this chunk is due soon (busypoll.py)
        self.prev, self.tail = self.tail, data
        now = self.clock()
        if now >= self.next_mark and (self.counts_all or self.tunnel.counts(self, data)):
            self.next_mark = now + MARK_EVERY
            self.mark()

    def eof_received(self) -> bool:
        self._ended()
        return True  # keep the connection open for writing (half-close)

    def _ended(self) -> None:
        if self.read_done:
            return
        self.read_done = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            if not ends_with_close_frame(self.prev[-131:] + self.tail[-131:],
                                         masked=self.masked):
                # in the vanished side's name: masked when it is the browser
                peer.transport.write(close_frame(GOING_WRONG, masked=self.masked))
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            else:
                peer.transport.close()
        self.tunnel.side_ended()

    # -- writing (flow control: this side's write buffer pauses the peer's reading) -----
    def pause_writing(self) -> None:
        self.writing_paused = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.resume_reading()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self._wake()
        self._ended()
        if self.on_lost is not None:
            self.on_lost(exc)
        self.tunnel.side_lost()

    # aiohttp's RequestHandler.set_parser interface: receives the bytes the browser sent
    # after its upgrade request before the tunnel took its transport over.
    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data_received(data)
        return False, b""

    def feed_eof(self) -> None:
        pass


class Tunnel:
    """Joins a browser connection (masked frames) to a workspace connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, mark: Callable[[], None], *,
                 kick: Callable[[], None], sort_activity: bool = False) -> None:
        self.loop = loop
        self.mark = mark
        self.kick = kick  # called after each chunk is passed on (BusyPoll.kick)
        self.sort_activity = sort_activity
        self.vscode: bool | None = None  # undecided until the browser's first chunk
        self.browser = Side(self, masked=True)
        self.upstream = Side(self, masked=False)
        self._ended = 0
        self._lost = 0
        self._done: asyncio.Future[None] = loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._discarded = False

    def counts(self, side: Side, data: bytes) -> bool:
        """Does this chunk mark the workspace active (the socket's activity is sorted)?"""
        if self.vscode:
            return idle.counts(data, masked=side.masked)
        if self.vscode is None and side.masked:
            self.vscode = idle.speaks_vscode(data)
            if not self.vscode:  # not code-server's protocol: all traffic counts
                self.browser.counts_all = self.upstream.counts_all = True
        return True  # undecided: the workspace's bytes before the browser's first

    def join(self) -> None:
        """Wire both sides (both transports attached); flush what was read meanwhile."""
        b, u = self.browser, self.upstream
        b.peer, u.peer = u, b
        for side in (u, b):
            pending, side.buffer = side.buffer, None
            if pending:
                side.data_received(bytes(pending))
        assert u.transport is not None
        u.transport.resume_reading()

    def side_ended(self) -> None:
        if self._discarded:
            return
        self._ended += 1
        if self._ended == 2:
            self._close_both()
        elif self._timer is None:
            self._timer = self.loop.call_later(HALF_CLOSE_WAIT, self._close_both)

    def side_lost(self) -> None:
        if self._discarded:
            return
        self._lost += 1
        if self._lost == 1:
            self._close_both()  # the other one is closed once its buffer is flushed
        if self._lost == 2 and not self._done.done():
            self._done.set_result(None)

    def _close_both(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(CLOSE_WAIT, self.abort)
        for side in (self.browser, self.upstream):
            if side.transport is not None and not side.lost:
                side.transport.close()

    def discard(self) -> None:
        """The handshake failed: drop what exists, leave no timer behind."""
        self._discarded = True
        self.abort()
        if self._timer is not None:
            self._timer.cancel()

    def abort(self) -> None:
        for side in (self.browser, self.upstream):
            if side.transport is not None and not side.lost:
                side.transport.abort()

    async def run(self) -> None:
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.abort()
            # abort() reports connection_lost on the next loop iterations
            await asyncio.wait([self._done], timeout=1.0)
            raise
        finally:
            if self._timer is not None:
                self._timer.cancel()
