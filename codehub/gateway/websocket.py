"""The WebSocket relay: one browser socket joined to one socket to the workspace.

Guarantees:
- The upstream handshake happens first, with the client's headers (hop-by-hop ones and
  the gateway's cookie removed, X-Forwarded-* set as for HTTP (proxy.Forwarding), Host
  and Origin kept; the gateway has checked the Origin before, see handler.py) and its offered
  subprotocols; the browser is then answered with the subprotocol the workspace chose.
  A workspace that refuses the handshake makes the gateway refuse it too, before the
  browser's upgrade is accepted.
- Text, binary, ping and pong are relayed as they are, in order, each direction by its
  own pump; text goes through as the bytes that arrived (never decoded, re-encoded). The
  relay imposes no message size limit and adds no compression (permessage-deflate is
  negotiated on neither side).
- Close codes travel both ways: the side that closes first has its code and reason sent
  to the other side, and the other side's answer completes the first side's handshake.
  A side that vanishes without a close frame closes the other with 1011. Waiting for a
  peer's close reply is bounded (CLOSE_WAIT), then the connection is dropped.
- When either side is gone both are closed and both pumps have ended before `relay`
  returns: no task and no socket outlives the relayed connection (a test counts them).
- Every relayed message (either direction) marks the workspace active.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Literal

import aiohttp
from aiohttp import WSMsgType, web

from ..metrics import WEBSOCKETS_OPEN, WEBSOCKETS_OPENED
from .activity import Activity
from .proxy import Forwarding, connection_tokens

_DROP_TRUSTED = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "cookie", "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-protocol", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
    "x-forwarded-prefix", "content-length",
})
_DROP = _DROP_TRUSTED | {"forwarded", "x-real-ip"}  # from anyone but a trusted proxy
_UNSENDABLE = frozenset({1004, 1005, 1006, 1015})
UPSTREAM_LOST = 1011
CLOSE_WAIT = 5.0


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


def _close_code(code: int | None) -> int:
    if code is None or code < 1000 or code in _UNSENDABLE or code > 4999:
        return 1000
    return code


class UpstreamRefused(Exception):
    """The workspace did not accept the WebSocket handshake (status 502: unreachable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def relay(session: aiohttp.ClientSession, request: web.Request, url: str,
                fwd: Forwarding, workspace_id: str, activity: Activity,
                ) -> web.WebSocketResponse[Literal[False]]:
    """Relay a WebSocket upgrade to `url` (ws://host:port/path?query). Raises
    UpstreamRefused before the browser is answered if the workspace refuses."""
    try:
        upstream = await session.ws_connect(
            url, protocols=_offered_protocols(request), headers=_upstream_headers(request, fwd),
            autoclose=False, autoping=False, max_msg_size=0, compress=0, heartbeat=None,
            decode_text=False)
    except aiohttp.WSServerHandshakeError as exc:
        raise UpstreamRefused(exc.status, f"workspace refused the WebSocket: {exc.message}"
                              ) from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise UpstreamRefused(502, f"cannot reach the workspace: {exc or type(exc).__name__}"
                              ) from None
    browser: web.WebSocketResponse[Literal[False]] = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        autoclose=False, autoping=False, max_msg_size=0, compress=False, heartbeat=None,
        decode_text=False)
    try:
        await browser.prepare(request)
    except BaseException:
        await upstream.close()
        raise
    activity.socket_opened(workspace_id)
    WEBSOCKETS_OPENED.inc()
    WEBSOCKETS_OPEN.inc()
    mark = activity.mark
    # One pump runs in this (the request's) task, the other in a task of its own: an idle
    # relayed socket costs one extra task, not two.
    to_browser = asyncio.ensure_future(_pump(upstream, browser, workspace_id, mark))
    try:
        await _pump(browser, upstream, workspace_id, mark)
        # The browser side is finished and the upstream side closed or closing: its pump's
        # receive() is woken by that close and ends.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(to_browser), timeout=CLOSE_WAIT)
    finally:
        if not to_browser.done():
            to_browser.cancel()
        await asyncio.gather(to_browser, return_exceptions=True)
        activity.socket_closed(workspace_id)
        WEBSOCKETS_OPEN.dec()
        await _close(upstream, UPSTREAM_LOST, b"")
        await _close(browser, UPSTREAM_LOST, b"")
    return browser


# Both ends are made with decode_text=False: text messages carry bytes.
_Socket = web.WebSocketResponse[Literal[False]] | aiohttp.ClientWebSocketResponse[Literal[False]]


async def _pump(src: _Socket, dst: _Socket, workspace_id: str, mark: Callable[[str], None]) -> None:
    """Copy messages from src to dst until src closes (then close dst with its code)."""
    receive = src.receive
    while True:
        msg = await receive()
        kind = msg.type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            # Text stays bytes (decode_text=False): relayed without decoding/re-encoding.
            mark(workspace_id)
            await dst.send_frame(msg.data, kind)
        elif kind is WSMsgType.PING:
            mark(workspace_id)
            await dst.ping(msg.data)
        elif kind is WSMsgType.PONG:
            await dst.pong(msg.data)
        elif kind is WSMsgType.CLOSE:
            # src started the close: pass its code on, then answer src with dst's reply.
            code = _close_code(msg.data)
            reason = (msg.extra or "").encode()[:123]
            await _close(dst, code, reason)
            reply = dst.close_code
            await _close(src, _close_code(reply) if reply else code, reason)
            return
        elif kind is WSMsgType.CLOSING:
            return  # the other pump is closing this side and completes the handshake
        else:  # CLOSED or ERROR: src vanished without a close frame
            await _close(dst, UPSTREAM_LOST, b"peer gone")
            return


async def _close(ws: _Socket, code: int, reason: bytes) -> None:
    """Close with a bounded wait for the peer's close frame. aiohttp's own timeout restarts
    with every message the peer sends meanwhile, so a peer that keeps talking but never
    answers the close (code-server's server does so) would hold the socket forever."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_WAIT):
            await ws.close(code=code, message=reason)
