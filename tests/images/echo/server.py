"""Echo workspace server: a stand-in for code-server that honours its container contract.

Pure standard library (asyncio, HTTP/1.1 and RFC 6455 written out here), so the image needs
nothing but the base image's python3 and behaves byte for byte as documented below.

Contract shared with code-server
- Listens for HTTP/1.1 and WebSocket on the address of ``--bind-addr HOST:PORT`` (default
  ``0.0.0.0:8080``); every other command-line argument (``--auth none``, a folder, ...) is
  accepted and ignored. SIGTERM and SIGINT stop it at once.
- ``GET /healthz`` answers 200 ``{"status":"alive","lastHeartbeat":<ms since epoch>}``; the
  heartbeat is the time of the latest request or WebSocket message other than ``/healthz``
  (the start time before any).

Behaviour the proxy tests assert on
- Any method on any path not listed here: 200 ``application/json``
  ``{"method", "path", "raw_path", "query_string", "headers", "body_len", "body_sha256"}``:
  ``raw_path`` is the request target exactly as received (query included), ``path`` its
  percent-decoded path part, ``query_string`` the raw part after ``?`` (or ``""``),
  ``headers`` a list of ``[name, value]`` in arrival order with the name's case and
  duplicates kept. The body (Content-Length or chunked, ``Expect: 100-continue`` honoured)
  is streamed through sha256 and never held in memory.
- ``GET /_echo/download?size=N``: N bytes of ``bytes(range(256))`` repeated, with
  Content-Length; with ``&chunked=1`` the same bytes with chunked transfer-encoding instead.
- ``GET /_echo/status/{code}``: that status (200..599); 204 and 304 have no body,
  other codes a small JSON body ``{"status": code}``.
- ``GET /_echo/headers?name=value&...``: each query pair becomes a response header, in
  order, repeats kept (``set-cookie=a&set-cookie=b`` gives two Set-Cookie headers); framing
  headers (content-length, transfer-encoding, connection) are skipped. The body is JSON
  ``{"headers": [[name, value], ...]}`` of what was set.
- ``GET /_echo/close-early``: headers with ``Content-Length: 1000``, then 10 bytes, then
  the connection is closed.
- ``GET /_echo/slow?seconds=S``: sleeps S seconds (at most 600), then 200 ``{"slept": S}``.
- ``GET /_echo/info``: 200 JSON ``{"argv", "uid", "gid", "home", "cwd", "env",
  "max_rss_kb"}`` of the server process (max_rss_kb: its peak resident memory, which shows
  that bodies are streamed).
- ``GET /_echo/home/<relative path>?name=value&...``: the file at that path under the
  server's ``$HOME`` (the user's own files, as code-server's static serving would show
  them), 200 with Content-Type guessed from the extension (``mimetypes``; unknown:
  ``application/octet-stream``) and Content-Length; each query pair is added as a response
  header as ``/_echo/headers`` does (a ``content-type`` pair replaces the guessed type), so
  ``sw.js?Service-Worker-Allowed=/`` serves a script with that header. The path is the
  percent-decoded one; an empty path, an absolute one, one with a ``..``, ``.`` or empty
  segment or a NUL, or one that is not a regular file (missing, a directory, or resolving
  outside ``$HOME`` through a symlink) is 404 ``{"error": "not found"}``. Meant for small
  files (read whole).
- ``GET /_echo/requests``: 200 JSON ``{"requests": [[method, raw_path], ...]}``, every
  request this process received, oldest first (the latest 1000), WebSocket upgrades
  included, other than ``/healthz`` and ``/_echo/requests`` itself: shows whether a
  request ever reached the workspace.
- HEAD on any of the above: the same status and headers, no body.
- Responses carry only Content-Type, Content-Length (or Transfer-Encoding) and the headers
  asked for; ``Connection: close`` when the client asked for it or spoke HTTP/1.0.

WebSocket (any path when the request is a GET upgrade, e.g. ``/_echo/ws``)
- The first subprotocol offered in Sec-WebSocket-Protocol (over all such headers) is
  accepted; no extension (permessage-deflate) is negotiated.
- Text and binary messages are echoed unchanged, fragmented ones reassembled; no message
  size limit. Pings are answered with pongs carrying the same payload. A frame under
  64 KiB is written in one write (head and payload together), as browsers and
  code-server do.
- Text ``close:<code>``: the server sends a close frame with that code (reason ``"bye"``),
  waits up to 5 s for the client's close frame, then closes the connection.
- Text ``headers``: the server answers a text message, JSON ``[[name, value], ...]`` of the
  upgrade request's headers in arrival order.
- A close frame from the client is answered with a close frame carrying the same code and
  reason (an empty one if the client sent no code); then the connection is closed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http
import json
import mimetypes
import os
import resource
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl, unquote

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PATTERN_BLOCK = bytes(range(256)) * 256  # 64 KiB; a multiple of 256 keeps the pattern aligned
READ_SIZE = 256 * 1024
HEADER_LIMIT = 256 * 1024
MAX_SLOW_SECONDS = 600.0
FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})
HOME_PREFIX = "/_echo/home/"
REQUEST_LOG_SIZE = 1000

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

Headers = list[tuple[str, str]]

_last_heartbeat_ms = int(time.time() * 1000)
_request_log: deque[tuple[str, str]] = deque(maxlen=REQUEST_LOG_SIZE)


def _touch() -> None:
    global _last_heartbeat_ms
    _last_heartbeat_ms = int(time.time() * 1000)


class BadRequest(Exception):
    """The client sent something that is not HTTP/1.1; answered with 400 and a close."""


class Request:
    """One parsed request head plus a reader positioned at its body."""

    def __init__(self, method: str, target: str, version: str, headers: Headers) -> None:
        self.method = method
        self.raw_path = target
        self.version = version
        self.headers = headers
        path, sep, query = target.partition("?")
        self.path = unquote(path)
        self.query_string = query if sep else ""
        self.query = parse_qsl(self.query_string, keep_blank_values=True)

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def header_tokens(self, name: str) -> list[str]:
        lname = name.lower()
        tokens: list[str] = []
        for key, value in self.headers:
            if key.lower() == lname:
                tokens.extend(t.strip() for t in value.split(",") if t.strip())
        return tokens

    def query_value(self, name: str, default: str = "") -> str:
        for key, value in self.query:
            if key == name:
                return value
        return default

    @property
    def keep_alive(self) -> bool:
        conn = [t.lower() for t in self.header_tokens("Connection")]
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


async def read_head(reader: asyncio.StreamReader) -> Request | None:
    """Read one request head; None when the peer closed between requests."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequest("truncated request head") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise BadRequest("request head too large") from exc
    lines = raw.decode("latin-1").split("\r\n")
    while lines and lines[0] == "":  # RFC 9112 2.2: ignore empty lines before a request
        lines.pop(0)
    if not lines:
        return None
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"bad request line {lines[0]!r}")
    headers: Headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"bad header line {line!r}")
        headers.append((name, value.strip(" \t")))
    return Request(parts[0], parts[1], parts[2], headers)


async def iter_body(
    req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> AsyncIterator[bytes]:
    """Yield the request body in pieces of at most READ_SIZE bytes (never the whole of it)."""
    chunked = "chunked" in [t.lower() for t in req.header_tokens("Transfer-Encoding")]
    length_header = req.header("Content-Length")
    if not chunked and not length_header:
        return
    if (req.header("Expect") or "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    if chunked:
        async for piece in _iter_chunked(reader):
            yield piece
        return
    try:
        remaining = int(length_header or "0")
    except ValueError as exc:
        raise BadRequest("bad Content-Length") from exc
    while remaining > 0:
        piece = await reader.read(min(remaining, READ_SIZE))
        if not piece:
            raise ConnectionResetError("body truncated")
        remaining -= len(piece)
        yield piece


async def _iter_chunked(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise BadRequest("bad chunk size") from exc
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return
        while size > 0:
            piece = await reader.read(min(size, READ_SIZE))
            if not piece:
                raise ConnectionResetError("chunk truncated")
            size -= len(piece)
            yield piece
        if await reader.readexactly(2) != b"\r\n":
            raise BadRequest("chunk not followed by CRLF")


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Status"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


async def send_head(
    writer: asyncio.StreamWriter, status: int, headers: Headers, keep_alive: bool
) -> None:
    out = [_status_line(status)]
    out.extend(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers)
    if not keep_alive:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    writer.write(b"".join(out))
    await writer.drain()


async def send_simple(
    req: Request,
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    *,
    content_type: str = "application/json",
    extra: Headers | None = None,
) -> None:
    headers: Headers = list(extra or [])
    if status in (204, 304):
        body = b""
    else:
        headers.append(("Content-Type", content_type))
        headers.append(("Content-Length", str(len(body))))
    await send_head(writer, status, headers, req.keep_alive)
    if body and req.method != "HEAD":
        writer.write(body)
        await writer.drain()


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


async def handle_download(req: Request, writer: asyncio.StreamWriter) -> None:
    try:
        size = int(req.query_value("size", "0"))
    except ValueError:
        size = -1
    if size < 0:
        await send_simple(req, writer, 400, _json({"error": "size must be an integer >= 0"}))
        return
    chunked = req.query_value("chunked") not in ("", "0") and req.version != "HTTP/1.0"
    headers: Headers = [("Content-Type", "application/octet-stream")]
    headers.append(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(size)))
    await send_head(writer, 200, headers, req.keep_alive)
    if req.method == "HEAD":
        return
    remaining = size
    while remaining > 0:
        block = PATTERN_BLOCK if remaining >= len(PATTERN_BLOCK) else PATTERN_BLOCK[:remaining]
        remaining -= len(block)
        if chunked:
            writer.write(b"%x\r\n" % len(block))
            writer.write(block)
            writer.write(b"\r\n")
        else:
            writer.write(block)
        await writer.drain()
    if chunked:
        writer.write(b"0\r\n\r\n")
        await writer.drain()


def home_file(relative: str) -> Path | None:
    """The regular file at `relative` under $HOME, or None (see GET /_echo/home/)."""
    home = os.environ.get("HOME")
    segments = relative.split("/")
    if (not home or not relative or relative.startswith("/") or "\0" in relative
            or any(seg in ("", ".", "..") for seg in segments)):
        return None
    root = Path(home).resolve()
    try:
        target = root.joinpath(*segments).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not target.is_relative_to(root) or not target.is_file():
        return None
    return target


async def handle_home_file(req: Request, writer: asyncio.StreamWriter, relative: str) -> None:
    target = home_file(relative)
    try:
        body = target.read_bytes() if target is not None else None
    except OSError:
        body = None
    if target is None or body is None:
        await send_simple(req, writer, 404, _json({"error": "not found"}))
        return
    chosen = [(k, v) for k, v in req.query if k.lower() not in FRAMING]
    content_type = next((v for k, v in chosen if k.lower() == "content-type"), None)
    if content_type is None:
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    extra = [(k, v) for k, v in chosen if k.lower() != "content-type"]
    await send_simple(req, writer, 200, body, content_type=content_type, extra=extra)


async def handle_echo_paths(req: Request, writer: asyncio.StreamWriter) -> bool:
    """Answer one of the /_echo/ endpoints; False if the path is not one of them."""
    path = req.path
    if path == "/_echo/download":
        await handle_download(req, writer)
    elif path.startswith("/_echo/status/"):
        try:
            code = int(path.rsplit("/", 1)[1])
        except ValueError:
            code = 0
        if not 200 <= code <= 599:
            await send_simple(req, writer, 400, _json({"error": "status must be 200..599"}))
        else:
            await send_simple(req, writer, code, _json({"status": code}))
    elif path == "/_echo/headers":
        chosen = [(k, v) for k, v in req.query if k.lower() not in FRAMING]
        body = _json({"headers": [list(pair) for pair in chosen]})
        await send_simple(req, writer, 200, body, extra=chosen)
    elif path == "/_echo/slow":
        try:
            seconds = min(max(float(req.query_value("seconds", "1")), 0.0), MAX_SLOW_SECONDS)
        except ValueError:
            seconds = 1.0
        await asyncio.sleep(seconds)
        await send_simple(req, writer, 200, _json({"slept": seconds}))
    elif path == "/_echo/info":
        info = {
            "argv": sys.argv,
            "uid": os.getuid(),
            "gid": os.getgid(),
            "home": os.environ.get("HOME"),
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
        await send_simple(req, writer, 200, _json(info))
    elif path.startswith(HOME_PREFIX):
        await handle_home_file(req, writer, path[len(HOME_PREFIX):])
    elif path == "/_echo/requests":
        await send_simple(req, writer, 200,
                          _json({"requests": [list(pair) for pair in _request_log]}))
    else:
        return False
    return True


async def handle_http(
    req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """Answer one plain HTTP request; True if the connection may carry another one."""
    digest = hashlib.sha256()
    body_len = 0
    async for piece in iter_body(req, reader, writer):
        digest.update(piece)
        body_len += len(piece)
    if req.path == "/healthz" and req.method in ("GET", "HEAD"):
        body = _json({"status": "alive", "lastHeartbeat": _last_heartbeat_ms})
        await send_simple(req, writer, 200, body)
        return req.keep_alive
    _touch()
    if req.path != "/_echo/requests":
        _request_log.append((req.method, req.raw_path))
    if req.path == "/_echo/close-early" and req.method in ("GET", "HEAD"):
        await send_head(
            writer,
            200,
            [("Content-Type", "application/octet-stream"), ("Content-Length", "1000")],
            True,
        )
        writer.write(PATTERN_BLOCK[:10])
        await writer.drain()
        return False
    if req.method in ("GET", "HEAD") and await handle_echo_paths(req, writer):
        return req.keep_alive
    echo = {
        "method": req.method,
        "path": req.path,
        "raw_path": req.raw_path,
        "query_string": req.query_string,
        "headers": [list(pair) for pair in req.headers],
        "body_len": body_len,
        "body_sha256": digest.hexdigest(),
    }
    await send_simple(req, writer, 200, _json(echo))
    return req.keep_alive


# --- WebSocket (RFC 6455) -------------------------------------------------------------


class WsProtocolError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def _unmask(data: bytes, mask: bytes) -> bytes:
    # One big-integer XOR runs in C: a 16 MiB frame unmasks in milliseconds, not seconds.
    n = len(data)
    if n == 0:
        return data
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


async def ws_read_frame(reader: asyncio.StreamReader) -> tuple[bool, int, bytes]:
    b0, b1 = await reader.readexactly(2)
    if b0 & 0x70:
        raise WsProtocolError(1002, "reserved bits set")
    fin, opcode, masked, length = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    mask = await reader.readexactly(4) if masked else b""
    payload = await reader.readexactly(length)
    if masked:
        payload = _unmask(payload, mask)
    if opcode >= 0x8 and (not fin or length > 125):
        raise WsProtocolError(1002, "bad control frame")
    return fin, opcode, payload


async def ws_send(writer: asyncio.StreamWriter, opcode: int, payload: bytes) -> None:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    if n < 1 << 16:  # one write, as browsers and code-server send a frame
        writer.write(head + payload)
    else:
        writer.write(head)
        writer.write(payload)
    await writer.drain()


def _close_payload(code: int, reason: str) -> bytes:
    return struct.pack("!H", code) + reason.encode()[:120]


async def ws_handshake(req: Request, writer: asyncio.StreamWriter) -> bool:
    key = req.header("Sec-WebSocket-Key")
    if not key:
        await send_simple(req, writer, 400, _json({"error": "missing Sec-WebSocket-Key"}))
        return False
    accept = base64.b64encode(hashlib.sha1(key.strip().encode() + WS_GUID).digest())
    headers: Headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept.decode()),
    ]
    protocols = req.header_tokens("Sec-WebSocket-Protocol")
    if protocols:
        headers.append(("Sec-WebSocket-Protocol", protocols[0]))
    await send_head(writer, 101, headers, True)
    return True


async def _await_close(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            while True:
                _fin, opcode, _payload = await ws_read_frame(reader)
                if opcode == OP_CLOSE:
                    return


async def ws_on_message(
    req: Request,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    opcode: int,
    message: bytes,
) -> bool:
    """Answer one complete message; False once the server has closed the session."""
    if opcode == OP_BINARY:
        await ws_send(writer, OP_BINARY, message)
        return True
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WsProtocolError(1007, "text message is not UTF-8") from exc
    if text.startswith("close:"):
        try:
            code = int(text[6:])
        except ValueError:
            code = 1000
        await ws_send(writer, OP_CLOSE, _close_payload(code, "bye"))
        await _await_close(reader)
        return False
    if text == "headers":
        await ws_send(writer, OP_TEXT, _json([list(pair) for pair in req.headers]))
        return True
    await ws_send(writer, OP_TEXT, message)
    return True


async def ws_on_control(writer: asyncio.StreamWriter, opcode: int, payload: bytes) -> bool:
    """Answer a control frame; False once the session is over (a close was answered)."""
    if opcode == OP_PING:
        await ws_send(writer, OP_PONG, payload)
    elif opcode == OP_CLOSE:
        await ws_send(writer, OP_CLOSE, payload[:125] if len(payload) >= 2 else b"")
        return False
    elif opcode != OP_PONG:
        raise WsProtocolError(1002, f"unknown opcode {opcode}")
    return True


async def handle_websocket(
    req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    if not await ws_handshake(req, writer):
        return
    pending_op: int | None = None  # opcode of the fragmented message being assembled
    parts: list[bytes] = []
    try:
        while True:
            try:
                fin, opcode, payload = await ws_read_frame(reader)
            except asyncio.IncompleteReadError:
                return
            _touch()
            if opcode not in (OP_TEXT, OP_BINARY, OP_CONT):
                if not await ws_on_control(writer, opcode, payload):
                    return
                continue
            if (opcode == OP_CONT) != (pending_op is not None):
                raise WsProtocolError(1002, "unexpected continuation state")
            if opcode != OP_CONT:
                pending_op = opcode
            parts.append(payload)
            if fin:
                assert pending_op is not None
                message = parts[0] if len(parts) == 1 else b"".join(parts)
                op, pending_op, parts = pending_op, None, []
                if not await ws_on_message(req, reader, writer, op, message):
                    return
    except WsProtocolError as exc:
        with contextlib.suppress(Exception):
            await ws_send(writer, OP_CLOSE, _close_payload(exc.code, str(exc)))


def _is_upgrade(req: Request) -> bool:
    return (
        req.method == "GET"
        and "websocket" in [t.lower() for t in req.header_tokens("Upgrade")]
        and "upgrade" in [t.lower() for t in req.header_tokens("Connection")]
    )


async def handle_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                req = await read_head(reader)
            except BadRequest as exc:
                detail = str(exc).encode()
                head = b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(detail)
                writer.write(_status_line(400) + head + detail)
                await writer.drain()
                return
            if req is None:
                return
            if _is_upgrade(req):
                _touch()
                _request_log.append((req.method, req.raw_path))
                await handle_websocket(req, reader, writer)
                return
            if not await handle_http(req, reader, writer):
                return
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, BadRequest):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def bind_address(argv: list[str]) -> tuple[str, int]:
    """The address of code-server's ``--bind-addr`` (either spelling); 0.0.0.0:8080 if absent."""
    value = "0.0.0.0:8080"
    for i, arg in enumerate(argv):
        if arg == "--bind-addr" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--bind-addr="):
            value = arg.split("=", 1)[1]
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


async def main() -> None:
    host, port = bind_address(sys.argv[1:])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(
        handle_connection, host, port, limit=HEADER_LIMIT, reuse_address=True
    )
    print(f"codehub-echo listening on {host}:{port} argv={sys.argv[1:]}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
