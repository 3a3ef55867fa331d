"""What counts as a person working, read from the bytes of a relayed WebSocket.

Guarantees:
- Pure functions of one chunk (the bytes of one read): no state, no allocation, a handful
  of byte reads; safe to call from the tunnel's per-chunk hook (tunnel.py).
- `speaks_vscode(chunk)` is true only when the chunk starts with a whole masked binary
  WebSocket frame (the browser's side) that holds exactly one message of VS Code's
  remote protocol (code-server's): a 13-byte header whose type byte is one of the
  protocol's and whose length field is the rest of the frame. The first message a
  workbench sends on each of its sockets is such a frame (its `auth` control message);
  anything else (a custom image, a text protocol, a frame split across reads) is not.
- `counts(chunk, masked=...)` on a socket that speaks VS Code's protocol: a chunk larger
  than QUIET_CHUNK counts; a smaller one counts unless its first frame is a ping or pong,
  a protocol control message (connection set-up, reconnection), a Regular message of at
  most QUIET_REGULAR bytes (the background messages an untouched workbench exchanges), or
  a bodiless protocol message (KeepAlive, Ack, pause, resume, disconnect, replay) with at
  most QUIET_REGULAR bytes of further messages after it in the same frame (VS Code's
  writer joins messages: an Ack and a key press travel as one frame). Anything it cannot
  read (a frame head cut short, another opcode, an unknown type byte) counts: in doubt,
  a workspace stays up. Only the first frame of a read is looked at, and a read is taken
  to start at a frame: browsers and code-server write each small frame whole, so its
  frames arrive whole; a small read from the middle of a message ends a large one, whose
  first read counted.
- The thresholds come from a measured idle code-server tab (README, "Idle"): its
  messages are 13-byte KeepAlives and Acks and 38-byte Regular messages; a line of
  terminal output, a key typed in the editor or the terminal are Regular messages of
  more than QUIET_REGULAR bytes.
"""

from __future__ import annotations

# VS Code's remote protocol (src/vs/base/parts/ipc/common/ipc.net.ts, ProtocolMessageType)
REGULAR = 1
CONTROL = 2
ACK = 3
DISCONNECT = 5
REPLAY_REQUEST = 6
PAUSE = 7
RESUME = 8
KEEP_ALIVE = 9
HEADER = 13
_TYPES = (REGULAR, CONTROL, ACK, DISCONNECT, REPLAY_REQUEST, PAUSE, RESUME, KEEP_ALIVE)
# Types without a body: bytes after their 13-byte header are further messages.
_BODILESS = (ACK, KEEP_ALIVE, DISCONNECT, REPLAY_REQUEST, PAUSE, RESUME)

QUIET_REGULAR = 48
"""Regular messages up to this many bytes (header included) are background chatter."""
QUIET_CHUNK = 128
"""Chunks larger than this count without being looked at."""

_BINARY = 0x2
_PING = 0x9
_PONG = 0xA


def speaks_vscode(chunk: bytes) -> bool:
    """Does the browser's first chunk on a socket start with a VS Code protocol message?"""
    n = len(chunk)
    if n < 2 + 4 + HEADER or chunk[0] & 0x0F != _BINARY or not chunk[1] & 0x80:
        return False
    size = chunk[1] & 0x7F
    at = 2
    if size == 126:
        size = chunk[2] << 8 | chunk[3]
        at = 4
    elif size == 127:
        return False
    mask = chunk[at:at + 4]
    at += 4
    if size < HEADER or n < at + HEADER:
        return False
    kind = chunk[at] ^ mask[0]
    length = ((chunk[at + 9] ^ mask[1]) << 24 | (chunk[at + 10] ^ mask[2]) << 16
              | (chunk[at + 11] ^ mask[3]) << 8 | (chunk[at + 12] ^ mask[0]))
    return kind in _TYPES and length == size - HEADER


def counts(chunk: bytes, *, masked: bool) -> bool:
    """Is this chunk of a VS Code socket a person's doing (see the module's guarantees)?"""
    n = len(chunk)
    if n > QUIET_CHUNK or n < 2:
        return True
    opcode = chunk[0] & 0x0F
    if opcode in (_PING, _PONG):
        return False
    if opcode != _BINARY:
        return True
    size = chunk[1] & 0x7F
    at = 2
    if size == 126:
        if n < 4:
            return True
        size = chunk[2] << 8 | chunk[3]
        at = 4
    if masked:
        if n <= at + 4:
            return True
        kind = chunk[at + 4] ^ chunk[at]
    else:
        if n <= at:
            return True
        kind = chunk[at]
    if kind == REGULAR:
        return size > QUIET_REGULAR
    if kind in _BODILESS:  # quiet, unless a larger message rides in the same frame
        return size - HEADER > QUIET_REGULAR
    return kind != CONTROL
