"""Connection admission: who may hold how many connections and WebSockets, and for how long
a connection may stay silent.

Connection-level limits act before aiohttp parses a byte: `Admission.factory` wraps the
runner's protocol factory (what `loop.create_server` is given), and its protocol counts
each connection per peer address in `connection_made`, aborting the transport at once when
the peer or the whole process is over its limit (no HTTP is possible yet: a closed
connection is the answer), and giving the slot back in `connection_lost`. Behind a trusted
proxy the peer is the proxy, so these limits apply per proxy.

Guarantees:
- A connection over `limits.connections_per_client` (per peer address) or over the global
  cap (`limits.max_connections`, default half the descriptor soft limit, leaving the rest
  for upstream sockets, the database and Docker) is aborted in `connection_made`, before
  aiohttp sees it, and counted in `codehub_connections_refused{reason}`.
- A connection that has not sent a complete first request head within
  `limits.header_timeout` seconds is closed (`reason="header_timeout"`). The cost is one
  timer per connection, armed once; requests on a kept-alive connection add nothing.
  Between requests, aiohttp's keep-alive timeout (`limits.idle_timeout`, armed at
  connection_made) closes a connection that sends nothing, including one that never sent
  a byte.
- After the wrapper's `connection_made`, the transport calls aiohttp's own
  `data_received` (and flow-control callbacks) directly: the wrapper is not on the data
  path.
- WebSockets are counted per workspace and per client address (X-Forwarded-For's last
  entry when the peer is a trusted proxy) before the upgrade is accepted; over either
  limit the answer is 429 with Retry-After and a body saying which limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.web_runner import BaseRunner, BaseSite

from .. import metrics
from ..config import LimitsConfig

log = logging.getLogger(__name__)

RETRY_AFTER = 5


def global_cap(cfg: LimitsConfig, soft_limit: int) -> int:
    """limits.max_connections, or half the descriptor soft limit when it is 0."""
    return cfg.max_connections or max(1, soft_limit // 2)


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""  # a Unix socket: every connection is the same client


class Admission:
    """Counts connections per peer and in total; wraps a protocol factory."""

    def __init__(self, cfg: LimitsConfig, max_connections: int) -> None:
        self.per_client = cfg.connections_per_client
        self.max_connections = max_connections
        self.header_timeout = cfg.header_timeout
        self.total = 0
        self.by_peer: dict[str, int] = {}

    def factory(self, server: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            return _Admitted(server(), self)
        return make

    def admit(self, peer: str) -> str | None:
        """Take a slot for `peer`; return why not (a metrics reason) when over a limit."""
        if self.total >= self.max_connections:
            return "global"
        n = self.by_peer.get(peer, 0)
        if n >= self.per_client:
            return "per_client"
        self.by_peer[peer] = n + 1
        self.total += 1
        return None

    def release(self, peer: str) -> None:
        self.total -= 1
        n = self.by_peer[peer] - 1
        if n:
            self.by_peer[peer] = n
        else:
            del self.by_peer[peer]


class _Admitted(asyncio.Protocol):
    """aiohttp's protocol behind an admission check. Only connection_made/lost pass
    through here; the data callbacks are the inner protocol's bound methods."""

    __slots__ = ("_admission", "_inner", "_peer", "_timer", "data_received",
                 "eof_received", "pause_writing", "resume_writing")

    def __init__(self, inner: Any, admission: Admission) -> None:
        self._inner = inner
        self._admission = admission
        self._peer: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Instance attributes shadow the methods: transports look these up (uvloop once,
        # at connection time), so the data path goes straight to aiohttp.
        self.data_received = inner.data_received  # type: ignore[method-assign]
        self.eof_received = inner.eof_received  # type: ignore[method-assign]
        self.pause_writing = inner.pause_writing  # type: ignore[method-assign]
        self.resume_writing = inner.resume_writing  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = _peer(transport)
        refused = self._admission.admit(peer)
        if refused is not None:
            metrics.CONNECTIONS_REFUSED.labels(refused).inc()
            self.data_received = _drop  # type: ignore[method-assign]
            self.eof_received = _no_eof  # type: ignore[method-assign]
            cast(asyncio.Transport, transport).abort()
            return
        self._peer = peer
        metrics.CONNECTIONS_OPEN.inc()
        self._inner.connection_made(transport)
        timeout = self._admission.header_timeout
        if timeout > 0:
            self._timer = asyncio.get_running_loop().call_later(
                timeout, self._head_deadline, transport)

    def _head_deadline(self, transport: asyncio.BaseTransport) -> None:
        self._timer = None
        # aiohttp counts request heads as it parses them (RequestHandler._request_count).
        if getattr(self._inner, "_request_count", 1) == 0 and not transport.is_closing():
            metrics.CONNECTIONS_REFUSED.labels("header_timeout").inc()
            cast(asyncio.Transport, transport).abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._peer is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._admission.release(self._peer)
        self._peer = None
        metrics.CONNECTIONS_OPEN.dec()
        self._inner.connection_lost(exc)


def _drop(data: bytes) -> None:
    pass


def _no_eof() -> bool | None:
    return None


class AdmittedSite(BaseSite):
    """A TCP listener whose connections go through an `Admission` (the runner's TCPSite,
    with the protocol factory wrapped)."""

    __slots__ = ("_admission", "_host", "_port")

    def __init__(self, runner: BaseRunner, admission: Admission, host: str, port: int,
                 *, backlog: int = 1024) -> None:
        super().__init__(runner, backlog=backlog)
        self._admission = admission
        self._host = host
        self._port = port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._admission.factory(server), self._host, self._port, backlog=self._backlog,
            reuse_address=True)


class Slots:
    """Open things (event streams, relayed WebSockets) counted per workspace and per
    client address against two limits."""

    __slots__ = ("_clients", "_workspaces", "per_client", "per_workspace")

    def __init__(self, *, per_workspace: int, per_client: int) -> None:
        self.per_workspace = per_workspace
        self.per_client = per_client
        self._workspaces: dict[str, int] = {}
        self._clients: dict[str, int] = {}

    def take(self, workspace_id: str, client: str) -> str | None:
        """Reserve a slot; None if taken, else the limit that refused it ("workspace" or
        "client")."""
        w = self._workspaces.get(workspace_id, 0)
        if w >= self.per_workspace:
            return "workspace"
        c = self._clients.get(client, 0)
        if c >= self.per_client:
            return "client"
        self._workspaces[workspace_id] = w + 1
        self._clients[client] = c + 1
        return None

    def give(self, workspace_id: str, client: str) -> None:
        for counts, key in ((self._workspaces, workspace_id), (self._clients, client)):
            n = counts.get(key, 0) - 1
            if n > 0:
                counts[key] = n
            else:
                counts.pop(key, None)


def too_many_websockets(limit: str, slots: Slots) -> web.Response:
    """The 429 for a WebSocket upgrade over a limit (nothing was sent to the workspace)."""
    reason = f"websocket_{limit}"
    metrics.CONNECTIONS_REFUSED.labels(reason).inc()
    if limit == "workspace":
        text = (f"This workspace already has {slots.per_workspace} WebSocket connections "
                "open (limits.websockets_per_workspace).")
    else:
        text = (f"Your address already has {slots.per_client} WebSocket connections open "
                "(limits.websockets_per_client).")
    return web.Response(status=429, text=f"Too many WebSockets. {text} Try again later.\n",
                        headers={"Retry-After": str(RETRY_AFTER)})
