"""The HTTP reverse proxy: one request under /w/{id}/ forwarded to the workspace's IDE.

Guarantees:
- The request line carries the path below `/w/{id}` and the query string exactly as the
  client sent them (no decoding, re-encoding or normalisation).
- Hop-by-hop headers (RFC 9110 7.6.1) and every header named in `Connection` are dropped
  both ways; every other header is kept with its repeats (several Set-Cookie stay
  several). `Host` is kept as the client sent it, and `X-Forwarded-For`, `-Host`,
  `-Proto` and `-Prefix` are set (see `Forwarding`: a client's own values are replaced
  unless it is a trusted proxy), so code-server sees the public origin and accepts its
  WebSockets. `X-Request-Id` is the client's when well-formed, else a new one (exactly
  one reaches the workspace). The gateway's own cookie never reaches the workspace: it is
  removed from `Cookie`, the other cookies stay. On the way back, `Service-Worker-Allowed` and a
  `Set-Cookie` naming CodeHub's cookie never reach the browser.
- Bodies stream both ways with backpressure, whatever their size: no `client_max_size`,
  no buffering beyond a few hundred KiB, no decompression and no recompression
  (Content-Encoding passes through untouched). A body the client sent with
  Content-Length goes upstream with it; a chunked one goes chunked.
- No timeout cuts a response: only connecting is bounded (gateway.upstream_connect_timeout).
- HEAD, 204 and 304 answers carry no body. A workspace that refuses the connection
  raises `UpstreamError` before anything was sent to the client (the caller answers with
  a page); one that breaks the connection mid-response makes the gateway abort the
  client's connection, so the client sees a truncated response, never a complete-looking
  one. A client that goes away mid-response makes the gateway drop the upstream
  connection (it is never put back in the pool half-read).
- A bodiless GET/HEAD/OPTIONS that fails on a reused keep-alive connection before any
  response byte arrived is retried once on a new connection (the workspace closed an
  idle connection just as it was reused).

Hot path: no logging, no database, one list of header pairs built per request, and a
response that arrived whole (the common small case) is answered with one `web.Response`.
"""

from __future__ import annotations

import contextlib

from aiohttp import web
from multidict import istr

from ..logs import new_request_id, well_formed_request_id
from ..metrics import PROXY_ERRORS, PROXY_REQUESTS
from .auth import names_our_cookie
from .upstream import UpstreamConnection, UpstreamError, UpstreamPool

# Hop-by-hop headers, lower-case bytes (request side: raw headers are bytes).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
# Replaced by the gateway on the way in.
_REPLACED = frozenset({
    b"cookie", b"expect", b"content-length", b"x-forwarded-for", b"x-forwarded-host",
    b"x-forwarded-proto", b"x-forwarded-prefix", b"x-request-id",
})
_X_REQUEST_ID = istr("X-Request-Id")
# What a client says about where it came from: passed on only from a trusted proxy.
_CLAIMS = frozenset({b"forwarded", b"x-real-ip"})
DROP_REQUEST = HOP_BY_HOP | _REPLACED | _CLAIMS
DROP_REQUEST_TRUSTED = HOP_BY_HOP | _REPLACED
# Never from a workspace to the browser: a service worker's scope stays at most the
# directory of its script (no workspace widens it to the whole origin).
_DROP_RESPONSE = HOP_BY_HOP | {b"service-worker-allowed"}
_RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS"})


def connection_tokens(value: bytes) -> frozenset[bytes]:
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


_DROP_MEMO_SIZE = 64
_drop_memo: dict[tuple[frozenset[bytes], bytes], frozenset[bytes]] = {}


def dropping(base: frozenset[bytes], connection: bytes) -> frozenset[bytes]:
    """`base` plus the headers a Connection header names, memoised: nearly every peer
    sends the same one or two values ("keep-alive", "close", "Upgrade")."""
    key = (base, connection)
    drop = _drop_memo.get(key)
    if drop is None:
        drop = base | connection_tokens(connection)
        if len(_drop_memo) >= _DROP_MEMO_SIZE:
            _drop_memo.clear()
        _drop_memo[key] = drop
    return drop


class Forwarding:
    """What the gateway adds to a forwarded request (shared by HTTP and WebSocket).

    From an untrusted peer (the default: anyone) the X-Forwarded-* headers say what the
    gateway saw, whatever the client sent, and `drop` removes Forwarded and X-Real-IP.
    From a trusted proxy (gateway.trusted_proxies) its X-Forwarded-For is extended with
    the peer, its -Host, -Proto and -Prefix are kept, and so are Forwarded and X-Real-IP.
    Every forwarded request carries exactly one X-Request-Id: the client's when it is
    well-formed (logs.request_id_of), else a new one.
    """

    __slots__ = ("cookie", "drop", "forwarded_for", "host", "prefix", "proto", "request_id",
                 "trusted")

    def __init__(self, request: web.BaseRequest, prefix: str, *, trusted: bool,
                 remote: str | None = None) -> None:
        self.cookie: str | None = None
        self.trusted = trusted
        if remote is None:
            remote = request.remote or ""
        headers = request.headers
        # the client's own when well-formed, else a new one (logs.request_id_of, inlined)
        rid = headers.get(_X_REQUEST_ID)
        self.request_id = rid if rid is not None and well_formed_request_id(
            rid) else new_request_id()
        if trusted:
            prior = headers.getall("X-Forwarded-For", ())
            self.forwarded_for = ", ".join([*prior, remote]) if prior else remote
            self.host = headers.get("X-Forwarded-Host") or request.host
            self.proto = headers.get("X-Forwarded-Proto") or request.scheme
            self.prefix = headers.get("X-Forwarded-Prefix", "").rstrip("/") + prefix
            self.drop = DROP_REQUEST_TRUSTED
        else:
            self.forwarded_for = remote
            self.host = request.host
            self.proto = request.scheme
            self.prefix = prefix
            self.drop = DROP_REQUEST

    def block(self) -> bytes:
        """The same headers as `pairs`, as request-head bytes (built without the pairs:
        this runs on every proxied request)."""
        text = (f"X-Forwarded-For: {self.forwarded_for}\r\nX-Forwarded-Host: {self.host}\r\n"
                f"X-Forwarded-Proto: {self.proto}\r\nX-Request-Id: {self.request_id}\r\n")
        if self.prefix:
            text += f"X-Forwarded-Prefix: {self.prefix}\r\n"
        if self.cookie:
            text += f"Cookie: {self.cookie}\r\n"
        return text.encode("latin-1", "replace")

    def pairs(self) -> list[tuple[str, str]]:
        out = [("X-Forwarded-For", self.forwarded_for), ("X-Forwarded-Host", self.host),
               ("X-Forwarded-Proto", self.proto), ("X-Request-Id", self.request_id)]
        if self.prefix:
            out.append(("X-Forwarded-Prefix", self.prefix))
        if self.cookie:
            out.append(("Cookie", self.cookie))
        return out


def request_head(request: web.BaseRequest, target: str, fwd: Forwarding, host: str,
                 port: int, body: str) -> bytes:
    """The request line and headers for the workspace. `body` is "", "length" or "chunked"."""
    headers = request.headers
    drop = fwd.drop
    if "Connection" in headers:  # one C lookup instead of a scan of every header
        drop = dropping(drop, ",".join(headers.getall("Connection")).encode("latin-1"))
    parts = [b"%s %s HTTP/1.1\r\n" % (request.method.encode("ascii"),
                                        target.encode("utf-8", "surrogateescape"))]
    append = parts.append
    for name, value in request.raw_headers:
        if name.lower() not in drop:
            append(b"%s: %s\r\n" % (name, value))
    if "Host" not in headers:
        append(b"Host: %s:%d\r\n" % (host.encode(), port))
    append(fwd.block())
    if body == "length":
        append(b"Content-Length: %d\r\n" % (request.content_length or 0))
    elif body == "chunked":
        append(b"Transfer-Encoding: chunked\r\n")
    append(b"\r\n")
    return b"".join(parts)


def response_headers(raw: list[tuple[bytes, bytes]], connection: bytes | None,
                     ) -> list[tuple[str, str]]:
    """The headers for the browser: hop-by-hop ones, Service-Worker-Allowed and any
    Set-Cookie of CodeHub's own cookie removed (a workspace never sets nor shadows it)."""
    drop = dropping(_DROP_RESPONSE, connection) if connection else _DROP_RESPONSE
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw
            if (name := n.lower()) not in drop
            and not (name == b"set-cookie" and names_our_cookie(v))]


def _body_mode(request: web.BaseRequest) -> str:
    if request.content_length is not None:
        return "length" if request.content_length > 0 else ""
    if request.body_exists:
        return "chunked"
    return ""


async def _send_body(request: web.BaseRequest, conn: UpstreamConnection, chunked: bool) -> None:
    content = request.content
    while True:
        chunk = await content.readany()
        if not chunk:
            break
        if chunked:
            conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            conn.write(chunk)
        await conn.drain()
    if chunked:
        conn.write(b"0\r\n\r\n")


async def exchange(pool: UpstreamPool, request: web.BaseRequest, host: str, port: int,
                    head: bytes, body: str) -> UpstreamConnection:
    """Send the request; return the connection once the response head arrived."""
    head_only = request.method == "HEAD"
    attempts = 2 if (not body and request.method in _RETRYABLE) else 1
    while True:
        attempts -= 1
        conn, reused = await pool.acquire(host, port)
        try:
            conn.begin(head, head_only=head_only)
            if body:
                try:
                    await _send_body(request, conn, body == "chunked")
                except UpstreamError:
                    # The workspace answered (or died) before taking the whole body: read
                    # what it said, and never reuse the connection.
                    conn.forbid_reuse()
            await conn.read_head()
            return conn
        except UpstreamError as exc:
            pool.release(conn, reusable=False)
            if reused and attempts > 0 and exc.no_response:
                continue
            raise
        except BaseException:
            pool.release(conn, reusable=False)
            raise


async def proxy_http(pool: UpstreamPool, request: web.Request, host: str, port: int,
                     target: str, fwd: Forwarding) -> web.StreamResponse:
    """Forward `request` to http://host:port`target`. Raises UpstreamError only when
    nothing was sent to the client yet."""
    PROXY_REQUESTS.inc()
    body = _body_mode(request)
    head = request_head(request, target, fwd, host, port, body)
    try:
        conn = await exchange(pool, request, host, port, head, body)
    except UpstreamError:
        PROXY_ERRORS.inc()
        raise
    headers = response_headers(conn.headers, conn.connection)
    if conn.complete:
        # The whole response is here (small bodies, HEAD, 204, 304): one Response.
        data = conn.take_buffered()
        pool.release(conn, reusable=True)
        return web.Response(status=conn.status, headers=headers, body=data or None)
    resp = web.StreamResponse(status=conn.status, headers=headers)
    reusable, released = False, False
    try:
        await resp.prepare(request)
        while True:
            chunk = await conn.read_chunk()
            if not chunk:
                break
            if conn.exhausted:
                # The last piece: give the connection back before the client has the
                # whole body and sends its next request (which would otherwise find no
                # idle connection and open one).
                released = True
                pool.release(conn, reusable=True)
            await resp.write(chunk)
        reusable = True
    except UpstreamError:
        PROXY_ERRORS.inc()
        # The workspace broke off mid-body: make the client see a truncated response.
        if request.transport is not None:
            request.transport.abort()
        return resp
    except ConnectionError:
        return resp  # the client went away
    finally:
        if not released:
            pool.release(conn, reusable=reusable)
    with contextlib.suppress(ConnectionError):
        await resp.write_eof()
    return resp
