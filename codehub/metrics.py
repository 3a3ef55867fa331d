"""Prometheus metrics: one registry, a handful of module-level instruments, `GET /metrics`.

Other modules record by calling the instruments directly, e.g.
`metrics.PROXY_REQUESTS.inc()`, `metrics.WEBSOCKETS_OPEN.inc()` / `.dec()`,
`metrics.BYTES_ARCHIVED.inc(n)`, `metrics.LEADER.set(1)`, `metrics.HINT_LAG.observe(s)`,
`metrics.activity_flushed(lag_seconds)`, and `with metrics.operation("ARCHIVING"): ...`.

Guarantees:
- No label carries a workspace id, owner or URL: every label has a small fixed set of
  values (a status, an operation kind, an API route template, an HTTP method and status),
  so the number of series does not grow with the number of workspaces or requests.
- `codehub_workspaces{status}` is counted from the database at scrape time (one GROUP BY),
  never tracked incrementally, so it cannot drift. Every replica reports the same count:
  aggregate it with max(), not sum(). When the database does not answer, the series are
  left out of that scrape rather than reported stale.
- Recording is cheap and synchronous (a lock and an add): safe on the proxy's hot path.
- The registry is CodeHub's own (plus process and GC collectors), not prometheus-client's
  global one, so nothing a library registers leaks into `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

from . import keys
from .model import Operation, Status
from .store import Store, StoreUnavailable

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
process_collector.ProcessCollector(registry=REGISTRY)
platform_collector.PlatformCollector(registry=REGISTRY)
gc_collector.GCCollector(registry=REGISTRY)

WORKSPACES = Gauge(
    "codehub_workspaces", "Workspaces by status, counted in the database at scrape time.",
    ["status"], registry=REGISTRY)

_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
OPERATIONS_STARTED = Counter(
    "codehub_operations_started", "Reconciler operations started, by kind.", ["kind"],
    registry=REGISTRY)
OPERATIONS_FAILED = Counter(
    "codehub_operations_failed", "Reconciler operations that raised, by kind.", ["kind"],
    registry=REGISTRY)
OPERATION_SECONDS = Histogram(
    "codehub_operation_duration_seconds",
    "Wall time of reconciler operations (successful or not), by kind.", ["kind"],
    buckets=_DURATION_BUCKETS, registry=REGISTRY)

PROXY_REQUESTS = Counter(
    "codehub_proxy_requests", "HTTP requests proxied to workspaces.", registry=REGISTRY)
PROXY_ERRORS = Counter(
    "codehub_proxy_errors", "Proxied requests that got no response from their workspace.",
    registry=REGISTRY)
ROUTE_LOADS = Counter(
    "codehub_route_loads", "Workspace rows the gateway read to fill its route table.",
    registry=REGISTRY)
EVENT_STREAMS = Gauge(
    "codehub_event_streams", "Loading-page event streams open now.", registry=REGISTRY)
EVENT_STREAMS_REFUSED = Counter(
    "codehub_event_streams_refused", "Event streams refused (429) by a limit, by limit.",
    ["limit"], registry=REGISTRY)
WEBSOCKETS_OPEN = Gauge(
    "codehub_websocket_connections", "WebSocket connections being relayed now.",
    registry=REGISTRY)
WEBSOCKETS_OPENED = Counter(
    "codehub_websocket_connections_opened", "WebSocket connections relayed since start.",
    registry=REGISTRY)
STEPPED_DOWN_UNDER_OPEN_TAB = Counter(
    "codehub_stepped_down_with_tab_open",
    "Workspaces asked to step down (WARM or COLD) while this replica relayed a WebSocket "
    "of theirs: an open IDE tab that did not keep its workspace up (gateway.activity = "
    "input). Per replica: a workspace with tabs on several replicas counts on each.",
    registry=REGISTRY)
CONNECTIONS_OPEN = Gauge(
    "codehub_client_connections", "Client connections admitted and open now.",
    registry=REGISTRY)
CONNECTIONS_REFUSED = Counter(
    "codehub_connections_refused",
    "Client connections closed or WebSockets refused by a limit, by reason (per_client, "
    "global, header_timeout, websocket_workspace, websocket_client).", ["reason"],
    registry=REGISTRY)
for _reason in ("per_client", "global", "header_timeout", "websocket_workspace",
                "websocket_client"):
    CONNECTIONS_REFUSED.labels(_reason)

BYTES_ARCHIVED = Counter(
    "codehub_archived_bytes", "Compressed bytes written to object storage by archives.",
    registry=REGISTRY)
BYTES_RESTORED = Counter(
    "codehub_restored_bytes", "Compressed bytes read from object storage by restores.",
    registry=REGISTRY)

LEADER = Gauge(
    "codehub_leader", "1 while this replica holds the leader lock and reconciles, else 0.",
    registry=REGISTRY)
HINT_LAG = Histogram(
    "codehub_hint_lag_seconds",
    "Seconds from a desired_state write (the row's updated_at) to the reconciler taking the "
    "workspace up.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY)
FLUSH_LAG = Gauge(
    "codehub_activity_flush_lag_seconds",
    "Age of the oldest activity mark written by the last activity flush.", registry=REGISTRY)
FLUSH_LAST = Gauge(
    "codehub_activity_flush_last_timestamp_seconds",
    "Unix time of the last successful activity flush.", registry=REGISTRY)

STALE_ROUTES_SERVED = Counter(
    "codehub_stale_routes_served", "Proxied requests served from a route the gateway could "
    "not re-read from the database (an outage, or a re-read still in flight).",
    registry=REGISTRY)
DATABASE_UNAVAILABLE = Gauge(
    "codehub_database_unavailable", "1 while the gateway's last route read failed because "
    "the database did not answer.", registry=REGISTRY)
API_REQUESTS = Counter(
    "codehub_api_requests", "Admin API requests by route template, method and status.",
    ["route", "method", "code"], registry=REGISTRY)

# Expose every kind from the start (at 0), so rates exist before the first operation.
for _op in Operation:
    if _op is not Operation.NONE:
        OPERATIONS_STARTED.labels(_op.value)
        OPERATIONS_FAILED.labels(_op.value)
        OPERATION_SECONDS.labels(_op.value)


@contextmanager
def operation(kind: str) -> Iterator[None]:
    """Count an operation started, its duration, and whether it raised. Cancellation (a
    lost leadership, a shutdown) is not a failure."""
    OPERATIONS_STARTED.labels(kind).inc()
    t0 = time.monotonic()
    try:
        yield
    except Exception:
        OPERATIONS_FAILED.labels(kind).inc()
        raise
    finally:
        OPERATION_SECONDS.labels(kind).observe(time.monotonic() - t0)


def activity_flushed(lag_seconds: float) -> None:
    """Record a successful activity flush whose oldest mark was `lag_seconds` old."""
    FLUSH_LAG.set(lag_seconds)
    FLUSH_LAST.set_to_current_time()


async def _count_workspaces(store: Store) -> None:
    try:
        async with asyncio.timeout(2):
            counts = await store.count_by_status()
    except (StoreUnavailable, TimeoutError) as exc:
        log.warning("metrics: workspace counts unavailable: %s", exc or type(exc).__name__)
        WORKSPACES.clear()
        return
    for status in Status:
        WORKSPACES.labels(status.value).set(counts.get(status.value, 0))


async def metrics_handler(request: web.Request) -> web.Response:
    await _count_workspaces(request.config_dict[keys.STORE])
    resp = web.Response(body=generate_latest(REGISTRY))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def setup(app: web.Application) -> None:
    """Serve `GET /metrics` (Prometheus text format, no authentication)."""
    app.router.add_get("/metrics", metrics_handler)
