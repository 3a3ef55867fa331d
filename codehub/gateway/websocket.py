"""The WebSocket relay: one browser socket joined to one socket to the workspace.

Guarantees:
- The upstream handshake happens first, with the client's headers (hop-by-hop ones and
  the gateway's cookie removed, X-Forwarded-* set as for HTTP (proxy.Forwarding), Host
  and Origin kept; the gateway has checked the Origin before, see handler.py) and its offered
  subprotocols; the browser is then answered with the subprotocol the workspace chose.
  A workspace that refuses the handshake (a status other than 101, or a 101 that is not a
  valid RFC 6455 answer: wrong Sec-WebSocket-Accept, a subprotocol that was not offered,
  an extension) makes the gateway refuse it too, before the browser's upgrade is
  accepted; an upgrade without a valid Sec-WebSocket-Key/Version 13 is refused with 400
  before the workspace is contacted.
- After both handshakes the gateway relays bytes, not messages (tunnel.py): frames of any
  kind and size go through unchanged and in order, memory per socket is bounded whatever
  the message size, backpressure works both ways. No extension is negotiated on either
  side (Sec-WebSocket-Extensions is neither offered upstream nor answered), so the bytes
  are plain RFC 6455 frames end to end.
- Close codes travel both ways as the close frames' own bytes. A side that vanishes
  without a close frame closes the other with 1011 (a close frame the gateway builds).
  When the gateway itself ends a socket (revocation: the handler task is cancelled;
  shutdown) both TCP connections are closed without a close frame (the browser sees
  1006 and reconnects, then meets the gateway's checks again).
- When either side is gone both are closed before `relay` returns: no task and no socket
  outlives the relayed connection (a test counts them); the relay adds no task.
- The byte flow (either direction) marks the workspace active, at most once per second
  per direction: every chunk with gateway.activity = "traffic"; with "input" only what
  a person caused on a socket of code-server's protocol (tunnel.py, idle.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
from collections.abc import Callable

import aiohttp
from aiohttp import web

from ..metrics import WEBSOCKETS_OPEN, WEBSOCKETS_OPENED
from .activity import Activity
from .proxy import Forwarding, connection_tokens
from .tunnel import Side, Tunnel

_DROP_TRUSTED = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "cookie", "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-protocol", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
    "x-forwarded-prefix", "content-length",
})
_DROP = _DROP_TRUSTED | {"forwarded", "x-real-ip"}  # from anyone but a trusted proxy
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HANDSHAKE_TIMEOUT = 30.0
MAX_HEAD = 64 * 1024


def is_upgrade(request: web.BaseRequest) -> bool:
    return (request.method == "GET"
            and request.headers.get("Upgrade", "").lower() == "websocket")


def _upstream_headers(request: web.BaseRequest, fwd: Forwarding) -> list[tuple[str, str]]:
    drop = _DROP_TRUSTED if fwd.trusted else _DROP
    conn = request.headers.get("Connection")
    if conn:
        drop = drop | {t.decode() for t in connection_tokens(conn.encode("latin-1"))}
    out = [(k, v) for k, v in request.headers.items() if k.lower() not in drop]
    out.extend(fwd.pairs())
    return out


def _offered_protocols(request: web.BaseRequest) -> list[str]:
    out: list[str] = []
    for value in request.headers.getall("Sec-WebSocket-Protocol", ()):
        out.extend(p.strip() for p in value.split(",") if p.strip())
    return out


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2): a check, not crypto."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode()


def _client_key(request: web.BaseRequest) -> str | None:
    key = request.headers.get("Sec-WebSocket-Key", "").strip()
    if request.headers.get("Sec-WebSocket-Version", "").strip() != "13":
        return None
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except (binascii.Error, ValueError):
        return None
    return key


class UpstreamRefused(Exception):
    """The workspace did not accept the WebSocket handshake (status 502: unreachable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def relay(session: aiohttp.ClientSession, request: web.Request, url: str,
                fwd: Forwarding, workspace_id: str, activity: Activity,
                kick: Callable[[], None]) -> web.StreamResponse:
    """Relay a WebSocket upgrade to `url` (ws://host:port/path?query) as a byte tunnel.
    Raises UpstreamRefused before the browser is answered if the workspace refuses.
    `session` only lends its connect timeout: the upstream is a connection of its own."""
    client_key = _client_key(request)
    if client_key is None:
        raise UpstreamRefused(400, "not a valid WebSocket upgrade (Sec-WebSocket-Key, "
                                   "Sec-WebSocket-Version: 13)")
    tunnel = Tunnel(asyncio.get_running_loop(), lambda: activity.mark(workspace_id),
                    sort_activity=activity.sort_sockets, kick=kick)
    try:
        chosen = await _handshake(session, request, url, fwd, tunnel.upstream)
        browser = await _answer_browser(request, client_key, chosen, tunnel)
    except BaseException:
        tunnel.discard()
        raise
    tunnel.join()
    activity.socket_opened(workspace_id)
    WEBSOCKETS_OPENED.inc()
    WEBSOCKETS_OPEN.inc()
    try:
        await tunnel.run()
    finally:
        activity.socket_closed(workspace_id)
        WEBSOCKETS_OPEN.dec()
    return browser


async def _handshake(session: aiohttp.ClientSession, request: web.Request, url: str,
                     fwd: Forwarding, up: Side) -> str | None:
    """Connect `up` to the workspace and upgrade it; the subprotocol it chose. Reading
    from it is paused until the browser is joined."""
    loop = asyncio.get_running_loop()
    offered = _offered_protocols(request)
    key = base64.b64encode(os.urandom(16)).decode()
    hostport, _, target = url.removeprefix("ws://").partition("/")
    host, _, port = hostport.rpartition(":")
    try:
        async with asyncio.timeout(session.timeout.sock_connect or HANDSHAKE_TIMEOUT):
            await loop.create_connection(lambda: up, host.strip("[]"), int(port))
    except (OSError, TimeoutError) as exc:
        raise UpstreamRefused(502, f"cannot reach the workspace: {exc or type(exc).__name__}"
                              ) from None
    try:
        assert up.transport is not None
        up.transport.write(_upgrade_request("/" + target, request, fwd, hostport, key, offered))
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            status, headers = await _read_head(up)
    except (OSError, TimeoutError) as exc:
        raise UpstreamRefused(502, f"the workspace did not answer the WebSocket: "
                                   f"{exc or type(exc).__name__}") from None
    chosen = _check_answer(status, headers, key, offered)
    up.transport.pause_reading()  # until the browser is joined
    return chosen


async def _answer_browser(request: web.Request, client_key: str, chosen: str | None,
                          tunnel: Tunnel) -> web.StreamResponse:
    """Answer the browser's upgrade (101), then take its connection over from aiohttp:
    set_parser hands the bytes the browser sent after its request (and keeps aiohttp
    from parsing more); then the transport's protocol becomes the tunnel's, and its loss
    is reported to aiohttp's."""
    browser = web.StreamResponse(status=101, headers={
        "Upgrade": "websocket", "Connection": "Upgrade",
        "Sec-WebSocket-Accept": accept_key(client_key)})
    if chosen:
        browser.headers["Sec-WebSocket-Protocol"] = chosen
    browser.force_close()
    await browser.prepare(request)
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the browser is gone")
    proto = request.protocol
    side = tunnel.browser
    proto.set_parser(side)  # type: ignore[arg-type]
    proto.keep_alive(False)
    side.on_lost = proto.connection_lost
    side.attach(transport)
    transport.set_protocol(side)
    return browser


def _upgrade_request(target: str, request: web.BaseRequest, fwd: Forwarding, hostport: str,
                     key: str, offered: list[str]) -> bytes:
    lines = [f"GET {target} HTTP/1.1"]
    headers = _upstream_headers(request, fwd)
    if not any(k.lower() == "host" for k, _ in headers):
        lines.append(f"Host: {hostport}")
    lines.extend(f"{k}: {v}" for k, v in headers)
    lines += ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
              "Sec-WebSocket-Version: 13"]
    if offered:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(offered))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


async def _read_head(up: Side) -> tuple[int, dict[str, str]]:
    """The workspace's answer head; bytes after it stay in the side's buffer."""
    loop = asyncio.get_running_loop()
    while True:
        buf = up.buffer or bytearray()
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(buf) > MAX_HEAD:
            raise UpstreamRefused(502, "the workspace's WebSocket answer head is too large")
        if up.lost:
            raise UpstreamRefused(502, "the workspace closed the connection during the "
                                       "WebSocket handshake")
        up.waiter = loop.create_future()
        await up.waiter
        up.waiter = None
    head = bytes(buf[:end]).decode("latin-1")
    rest = buf[end + 4:]
    up.buffer = rest if rest else None
    status_line, *header_lines = head.split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise UpstreamRefused(502, f"the workspace answered the WebSocket with "
                                   f"{status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise UpstreamRefused(502, "the workspace's WebSocket answer has a bad header")
        lname = name.strip().lower()
        headers[lname] = (headers[lname] + ", " if lname in headers else "") + value.strip()
    return int(parts[1]), headers


def _check_answer(status: int, headers: dict[str, str], key: str, offered: list[str],
                  ) -> str | None:
    if status != 101:
        raise UpstreamRefused(status, f"workspace refused the WebSocket: {status}")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in tokens:
        raise UpstreamRefused(502, "workspace refused the WebSocket: no upgrade in its 101")
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise UpstreamRefused(502, "workspace refused the WebSocket: wrong "
                                   "Sec-WebSocket-Accept")
    if headers.get("sec-websocket-extensions"):
        raise UpstreamRefused(502, "workspace refused the WebSocket: it answered with an "
                                   "extension that was not offered")
    chosen = headers.get("sec-websocket-protocol") or None
    if chosen is not None and chosen not in offered:
        raise UpstreamRefused(502, "workspace refused the WebSocket: it chose a subprotocol "
                                   "that was not offered")
    return chosen
