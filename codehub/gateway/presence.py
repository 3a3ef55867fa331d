"""The workbench's presence script: a person's keys and clicks in the IDE reach the gateway.

A person reading code, scrolling or clicking through files makes little or no WebSocket
traffic of the kind that counts (idle.py); this script tells the gateway about them, and
brings a tab whose workspace stepped down back through the loading page.

Guarantees:
- Only the workbench document gets the script, and only with gateway.activity = "input":
  a GET of the workspace's root (`<root>/`, any query) that a browser navigates to
  (`Sec-Fetch-Dest: document`). That one request is sent without Accept-Encoding (so
  the answer comes uncompressed); a 200 text/html answer of at most MAX_DOCUMENT bytes
  without Content-Encoding gets `<script src="./_codehub/presence.js">` (relative: the
  document is `<root>/`) right after its `<head>` (same origin, so the workbench's
  `script-src 'self'` allows it), with Content-Length adjusted; any other answer is
  passed on unchanged. Every other request costs one or two string comparisons
  (`Presence.wants`).
- `GET <root>/_codehub/presence.js`: the script (static/presence.js, no CDN, no-store);
  it names the endpoint relative to its own URL, so it works in path and host mode.
- `POST <root>/_codehub/activity` (the workspace's cookie and its own Origin required,
  like every state-changing request): when the workspace is RUNNING, ready and meant to
  stay so, marks it active and answers 200 `{"running": true, "every": S}`. Otherwise
  it wakes it as the loading page does (desired RUNNING, access recorded, hint) and
  answers 200 `{"running": false}`: the script reloads the tab, which lands on the
  loading page and from there in a new workbench. Without the database: 503 (JSON),
  and the script reports again later.
- The script reports a key press, pointer press, wheel or touch at most once per
  `every` seconds: 60, or a quarter of the workspace's warm TTL when that is shorter, so
  input always lands well within the TTL. The first input after a step-down always
  reports at once (no report for a whole warm TTL precedes a step-down).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from ..model import DesiredState, Status
from ..store import StoreUnavailable
from .activity import Activity
from .proxy import Forwarding, exchange, request_head, response_headers
from .routes import Route
from .upstream import UpstreamConnection, UpstreamError, UpstreamPool

SCRIPT_PATH = "/_codehub/presence.js"
ACTIVITY_PATH = "/_codehub/activity"
MAX_DOCUMENT = 1 << 20
REPORT_EVERY = 60
# Relative to the document at <root>/ (any query): right in path and host mode, and
# behind a proxy that adds a prefix of its own.
SCRIPT_SRC = b"." + SCRIPT_PATH.encode()
_HEAD = b"<head>"
_NO_ENCODING = frozenset({b"accept-encoding"})


def report_every(route: Route, default_warm_ttl: int) -> int:
    ws = route.workspace
    ttl = ws.warm_ttl_seconds if ws is not None and ws.warm_ttl_seconds else default_warm_ttl
    return max(1, min(REPORT_EVERY, ttl // 4))


class Presence:
    def __init__(self, static: Path, activity: Activity, *, enabled: bool,
                 default_warm_ttl: int) -> None:
        self.enabled = enabled
        self.script = (static / "presence.js").read_bytes()
        self.activity = activity
        self.default_warm_ttl = default_warm_ttl

    def wants(self, request: web.BaseRequest, target: str) -> bool:
        """Is this the browser loading the workbench document (the workspace's root), to
        be given the script? (Runs for every proxied request: cheapest test first.)"""
        return (self.enabled and (target == "/" or target.startswith("/?"))
                and request.method == "GET"
                and request.headers.get("Sec-Fetch-Dest") == "document")

    def script_response(self) -> web.Response:
        return web.Response(body=self.script, content_type="text/javascript",
                            charset="utf-8", headers={"Cache-Control": "no-store",
                                                      "X-Content-Type-Options": "nosniff"})

    async def report(self, workspace_id: str, route: Route,
                     wake: Callable[[str], Awaitable[None]]) -> web.Response:
        """The script's report of a person's input."""
        ws = route.workspace
        if (route.host and ws is not None and ws.status is Status.RUNNING
                and ws.desired_state is DesiredState.RUNNING):
            self.activity.mark(workspace_id)
            return web.json_response(
                {"running": True, "every": report_every(route, self.default_warm_ttl)},
                headers={"Cache-Control": "no-store"})
        if ws is not None:
            try:
                await wake(workspace_id)
            except StoreUnavailable as exc:  # the script tries again later
                return web.json_response({"error": f"database unavailable: {exc}"},
                                         status=503, headers={"Retry-After": "5"})
        return web.json_response({"running": False}, headers={"Cache-Control": "no-store"})

    async def workbench(self, pool: UpstreamPool, request: web.Request, host: str, port: int,
                        target: str, fwd: Forwarding) -> web.StreamResponse:
        """Proxy the workbench document with the script added (see the guarantees).
        Raises UpstreamError only when nothing was sent to the browser yet."""
        fwd.drop = fwd.drop | _NO_ENCODING
        head = request_head(request, target, fwd, host, port, "")
        conn = await exchange(pool, request, host, port, head, "")
        reusable = False
        try:
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_DOCUMENT and (chunk := await conn.read_chunk()):
                chunks.append(chunk)
                size += len(chunk)
            headers = response_headers(conn.headers, conn.connection)
            body = b"".join(chunks)
            if size > MAX_DOCUMENT:  # too large to be the workbench's page: pass it on
                return await _pass_on(request, conn, headers, body)
            reusable = True
        finally:
            pool.release(conn, reusable=reusable)
        if conn.status == 200 and _is_plain_html(headers):
            body = _insert(body, SCRIPT_SRC)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        return web.Response(status=conn.status, headers=headers, body=body)


def _is_plain_html(headers: list[tuple[str, str]]) -> bool:
    kind = next((v for k, v in headers if k.lower() == "content-type"), "")
    encoded = any(k.lower() == "content-encoding" and v.lower() != "identity"
                  for k, v in headers)
    return kind.lower().startswith("text/html") and not encoded


def _insert(body: bytes, src: bytes) -> bytes:
    at = body.find(_HEAD)
    if at < 0:
        return body
    at += len(_HEAD)
    return body[:at] + b'<script src="' + src + b'"></script>' + body[at:]


async def _pass_on(request: web.Request, conn: UpstreamConnection,
                   headers: list[tuple[str, str]], first: bytes) -> web.StreamResponse:
    resp = web.StreamResponse(status=conn.status, headers=headers)
    await resp.prepare(request)
    await resp.write(first)
    try:
        while chunk := await conn.read_chunk():
            await resp.write(chunk)
    except UpstreamError:
        if request.transport is not None:  # cut short: the browser must see it truncated
            request.transport.abort()
        return resp
    await resp.write_eof()
    return resp
