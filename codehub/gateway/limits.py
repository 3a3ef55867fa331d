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
- `raise_descriptor_limit` raises the soft RLIMIT_NOFILE to the hard limit at start and
  warns when the hard limit is low.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.web_runner import BaseRunner, BaseSite

from .. import metrics
from ..config import LimitsConfig

log = logging.getLogger(__name__)

LOW_HARD_LIMIT = 8192
RETRY_AFTER = 5


def raise_descriptor_limit() -> int:
    """Raise the soft descriptor limit to the hard one; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # pragma: no cover - a hard limit we may not set
            log.warning("limits: cannot raise the descriptor limit to %d: %s", hard, exc)
    if hard != resource.RLIM_INFINITY and hard < LOW_HARD_LIMIT:
        log.warning("limits: the descriptor hard limit is %d; every connection, upstream "
                    "socket and WebSocket takes one (raise it, e.g. LimitNOFILE=65536)", hard)
    return soft


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


class WebSocketLimits:
    """Relayed WebSockets per workspace and per client address."""

    def __init__(self, cfg: LimitsConfig) -> None:
        self.per_workspace = cfg.websockets_per_workspace
        self.per_client = cfg.websockets_per_client
        self.by_workspace: dict[str, int] = {}
        self.by_client: dict[str, int] = {}

    def acquire(self, workspace_id: str, client: str) -> web.Response | None:
        """Take a slot, or return the 429 to answer instead."""
        w = self.by_workspace.get(workspace_id, 0)
        c = self.by_client.get(client, 0)
        if w >= self.per_workspace:
            return self._refuse("websocket_workspace", f"This workspace already has {w} "
                                "WebSocket connections open (limits.websockets_per_workspace).")
        if c >= self.per_client:
            return self._refuse("websocket_client", f"Your address already has {c} "
                                "WebSocket connections open (limits.websockets_per_client).")
        self.by_workspace[workspace_id] = w + 1
        self.by_client[client] = c + 1
        return None

    def release(self, workspace_id: str, client: str) -> None:
        for table, key in ((self.by_workspace, workspace_id), (self.by_client, client)):
            n = table[key] - 1
            if n:
                table[key] = n
            else:
                del table[key]

    @staticmethod
    def _refuse(reason: str, text: str) -> web.Response:
        metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        return web.Response(status=429, text=f"Too many WebSockets. {text} Try again later.\n",
                            headers={"Retry-After": str(RETRY_AFTER)})


def client_address(remote: str, trusted: bool, forwarded_for: str | None) -> str:
    """The client a request counts against: the peer, or the last X-Forwarded-For entry
    (the one the trusted proxy added) when the peer is a trusted proxy."""
    if trusted and forwarded_for:
        last = forwarded_for.rsplit(",", 1)[-1].strip()
        if last:
            return last
    return remote
