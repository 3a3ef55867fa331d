"""Hostile load against a real gateway process: well-behaved traffic keeps being served while
a hostile client holds half-open, slow-header and event-stream connections.

    python bench/load.py run --database-url postgresql://... [--duration 60]

starts two child processes, an upstream (a small aiohttp server standing in for the
workspaces) and the gateway (the gateway app, served by `codehub serve`'s own code path,
cli.serve_app, so the connection admission of gateway/limits.py is the production one), puts
`--workspaces` RUNNING rows (routed to the upstream) and `--warm` WARM rows in the database,
then for `--duration` seconds runs at once:

- `--connections` well-behaved keep-alive connections (from 127.0.1.x, 200 per address) each
  sending a GET to a RUNNING workspace every `--interval` seconds;
- one measured client (127.0.0.1): a GET to a RUNNING workspace every 20 ms and /readyz
  every second, for its p50/p99;
- half-open connections (connect, send nothing) from 127.0.0.2: `limits.connections_per_client`
  of them plus `--extra-half-open` beyond, reopened as they are dropped;
- `--slow` slow-header connections (127.0.0.3.., 200 per address): a request head sent one
  byte every `--slow-interval` seconds, reopened as they are dropped;
- `--events` event streams (`/w/{id}/_codehub/events` on the WARM workspaces, from
  127.0.0.20.., 200 per address), reopened when they end.

It prints one JSON object: the counts, the well-behaved errors, the measured client's p50/p99,
how long the gateway let slow-header connections live, and how fast it closed half-open
connections beyond the limit. Loopback only; every child is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
SIGNING_KEY = "load-bench-signing-key"
PER_ADDRESS = 200


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the children ---------------------------------------------------------------------------

def serve_upstream(port: int) -> None:
    from aiohttp import web

    body = b"x" * 512

    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/plain")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None,
                backlog=4096)


def serve_gateway(database_url: str, port: int, upstream_port: int) -> None:
    """The gateway app with workspace routes resolved to the upstream, served by cli.serve_app.
    Settings beyond these come from CODEHUB_* in the environment (e.g. CODEHUB_LIMITS__*)."""
    from aiohttp import web

    from codehub import cli, config, gateway, health, keys, metrics
    from codehub.hints import InProcessHintBus
    from codehub.interfaces import (
        InstanceController,
        InstanceStatus,
        ManagedResource,
        UpstreamInfo,
    )
    from codehub.store import Store

    class Loopback(InstanceController):
        """Every workspace runs behind the one upstream (no container is started here)."""

        async def start(self, workspace_id: str, image_ref: str, volume_name: str) -> None:
            raise NotImplementedError

        async def stop(self, workspace_id: str) -> None:
            raise NotImplementedError

        async def delete(self, workspace_id: str) -> None:
            raise NotImplementedError

        async def get_status(self, workspace_id: str) -> InstanceStatus:
            raise NotImplementedError

        async def resolve_upstream(self, workspace_id: str) -> UpstreamInfo:
            return UpstreamInfo("127.0.0.1", upstream_port)

        async def list_managed(self) -> list[ManagedResource]:
            return []

    os.environ["CODEHUB_SERVER__PORT"] = str(port)
    os.environ["CODEHUB_DATABASE__URL"] = database_url
    os.environ.setdefault("CODEHUB_AUTH__SIGNING_KEYS", SIGNING_KEY)
    cfg = config.load(None)

    async def database(app: web.Application) -> AsyncIterator[None]:
        from codehub import postgres
        pool = await postgres.connect_pool(database_url, min_size=1,
                                           max_size=cfg.database.pool_max, connect_timeout=10)
        app[keys.POOL] = pool
        app[keys.STORE] = Store(pool)
        app[keys.HINTS] = InProcessHintBus()
        app[keys.INSTANCES] = Loopback()
        try:
            yield
        finally:
            await pool.close()

    app = web.Application()
    app[keys.CONFIG] = cfg
    app.cleanup_ctx.append(database)
    health.setup(app)
    metrics.setup(app)
    gateway.setup(app, instances=keys.INSTANCES)
    cli.serve_app(cfg, app)


# --- the load ---------------------------------------------------------------------------------

class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.latencies: list[float] = []
        self.ready_ok = 0
        self.ready_errors = 0
        self.half_open_admitted = 0
        self.half_open_refused_after: list[float] = []  # seconds from connect to close
        self.half_open_lived: list[float] = []
        self.slow_lived: list[float] = []
        self.events_status: dict[int, int] = {}
        self.events_open = 0
        self.events_open_max = 0
        self.probe_connect: list[float] = []  # seconds to connect, for the probes
        self.gap = 0.0  # longest time without a successful measured request
        self.last_ok = time.monotonic()

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def _open_from(source: str, port: int) -> tuple[asyncio.StreamReader,
                                                         asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _closed_after(reader: asyncio.StreamReader, start: float) -> float:
    """Wait until the gateway closes the connection; seconds since `start`."""
    with contextlib.suppress(ConnectionError, OSError):
        while await reader.read(65536):
            pass
    return time.monotonic() - start


async def half_open(port: int, limit: int, stop: float, t: Tally) -> None:
    """`limit` connections that send nothing from one address, reopened when dropped (the
    ones beyond the limit come from probe_beyond_limit, in the measuring process)."""
    async def hold(n: int) -> None:
        while time.monotonic() < stop:
            start = time.monotonic()
            try:
                reader, writer = await _open_from("127.0.0.2", port)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            t.half_open_lived.append(await _closed_after(reader, start))
            writer.close()
    await asyncio.gather(*(hold(n) for n in range(limit)))


async def slow_headers(port: int, count: int, interval: float, stop: float, t: Tally) -> None:
    head = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 4000

    async def one(n: int) -> None:
        source = f"127.0.0.{3 + n // PER_ADDRESS}"
        await asyncio.sleep(n * 0.002)
        while time.monotonic() < stop:
            start = time.monotonic()
            try:
                reader, writer = await _open_from(source, port)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            closed = asyncio.create_task(_closed_after(reader, start))
            with contextlib.suppress(ConnectionError, OSError):
                for i in range(len(head)):
                    if closed.done() or time.monotonic() >= stop:
                        break
                    writer.write(head[i:i + 1])
                    await asyncio.wait([closed], timeout=interval)
            if closed.done():
                t.slow_lived.append(closed.result())
            closed.cancel()
            writer.close()
    await asyncio.gather(*(one(n) for n in range(count)))


async def event_streams(port: int, count: int, warm: list[tuple[str, str]], stop: float,
                        t: Tally) -> None:
    async def one(n: int) -> None:
        source = f"127.0.0.{20 + n // PER_ADDRESS}"
        wid, cookie = warm[n % len(warm)]
        await asyncio.sleep(n * 0.003)
        conn = aiohttp.TCPConnector(local_addr=(source, 0), limit=0)
        async with aiohttp.ClientSession(connector=conn) as session:
            while time.monotonic() < stop:
                try:
                    async with session.get(
                            f"http://127.0.0.1:{port}/w/{wid}/_codehub/events",
                            headers={"Cookie": cookie, "Accept": "text/event-stream"},
                            timeout=aiohttp.ClientTimeout(total=stop - time.monotonic())) as r:
                        t.events_status[r.status] = t.events_status.get(r.status, 0) + 1
                        if r.status == 200:
                            t.events_open += 1
                            t.events_open_max = max(t.events_open_max, t.events_open)
                            try:
                                async for _ in r.content.iter_any():
                                    pass
                            finally:
                                t.events_open -= 1
                        else:
                            await r.read()
                            await asyncio.sleep(2)
                except (aiohttp.ClientError, OSError, TimeoutError):
                    await asyncio.sleep(0.5)
    await asyncio.gather(*(one(n) for n in range(count)))


async def well_behaved(port: int, count: int, running: list[tuple[str, str]], interval: float,
                       stop: float, t: Tally) -> None:
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        local_addr=(f"127.0.1.{1 + a}", 0), limit=0))
        for a in range((count + PER_ADDRESS - 1) // PER_ADDRESS)]

    async def one(n: int) -> None:
        session = sessions[n // PER_ADDRESS]
        wid, cookie = running[n % len(running)]
        url = f"http://127.0.0.1:{port}/w/{wid}/hello"
        await asyncio.sleep(interval * n / count)
        while time.monotonic() < stop:
            try:
                async with session.get(url, headers={"Cookie": cookie},
                                       timeout=aiohttp.ClientTimeout(total=30)) as r:
                    await r.read()
                    if r.status == 200:
                        t.ok += 1
                    else:
                        t.error(f"status {r.status}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                t.error(type(exc).__name__)
            await asyncio.sleep(interval)
    try:
        await asyncio.gather(*(one(n) for n in range(count)))
    finally:
        for s in sessions:
            await s.close()


async def measured(port: int, running: tuple[str, str], stop: float, t: Tally) -> None:
    wid, cookie = running
    async with aiohttp.ClientSession() as session:
        next_ready = 0.0
        while time.monotonic() < stop:
            start = time.monotonic()
            try:
                async with session.get(f"http://127.0.0.1:{port}/w/{wid}/hello",
                                       headers={"Cookie": cookie},
                                       timeout=aiohttp.ClientTimeout(total=10)) as r:
                    await r.read()
                    if r.status == 200:
                        now = time.monotonic()
                        t.latencies.append(now - start)
                        t.gap = max(t.gap, now - t.last_ok)
                        t.last_ok = now
                    else:
                        t.error(f"measured status {r.status}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                t.error(f"measured {type(exc).__name__}")
            if start >= next_ready:
                next_ready = start + 1
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz",
                                           timeout=aiohttp.ClientTimeout(total=5)) as r:
                        await r.read()
                        if r.status == 200:
                            t.ready_ok += 1
                        else:
                            t.ready_errors += 1
                except (aiohttp.ClientError, OSError, TimeoutError):
                    t.ready_errors += 1
            await asyncio.sleep(0.02)
    # up to the end of the measured span, not later: the probes may still be waiting
    t.gap = max(t.gap, min(time.monotonic(), stop) - t.last_ok)


async def probe_beyond_limit(port: int, extra: int, start_after: float, stop: float,
                             t: Tally) -> None:
    """`extra` connections from the half-open client's address, each reopened twice a
    second: how long until the gateway closes them (it should at once)."""
    async def one() -> None:
        while time.monotonic() < stop:
            start = time.monotonic()
            try:
                reader, writer = await _open_from("127.0.0.2", port)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            connected = time.monotonic()
            t.probe_connect.append(connected - start)
            t.half_open_refused_after.append(await _closed_after(reader, connected))
            writer.close()
            await asyncio.sleep(0.5)
    await asyncio.sleep(max(0.0, start_after - time.monotonic()))
    await asyncio.gather(*(one() for _ in range(extra)))


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The measured client and the beyond-limit probes, in a process of their own so the
    load generator's event loop does not add its lag to their figures."""
    _raise_nofile()
    stop = time.monotonic() + args.duration
    t = Tally()
    await asyncio.gather(
        measured(args.port, (args.workspace, args.cookie), stop, t),
        probe_beyond_limit(args.port, args.extra, time.monotonic() + 3, stop, t))
    return {"latencies": t.latencies, "gap": t.gap, "errors": t.errors, "ready_ok": t.ready_ok,
            "ready_errors": t.ready_errors, "beyond": t.half_open_refused_after,
            "probe_connect": t.probe_connect}


async def _rows(database_url: str, running: int, warm: int
                ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    import asyncpg

    from codehub import signing
    from codehub.gateway import auth
    from codehub.model import DesiredState, Operation, Status
    from codehub.store import Store, migrate

    keys = signing.SigningKeys((SIGNING_KEY.encode(),))
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    out: dict[Status, list[tuple[str, str]]] = {Status.RUNNING: [], Status.WARM: []}
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        store = Store(pool)
        for status, n, prefix in ((Status.RUNNING, running, "load-r"),
                                  (Status.WARM, warm, "load-w")):
            for i in range(n):
                wid = f"{prefix}{i:03d}"
                ws = await store.get(wid)
                if ws is None:
                    ws = await store.create(id=wid, owner="load", image_ref="load",
                                            desired_state=DesiredState(status.value))
                    ws = await store.compare_and_set(
                        wid, expect_status=Status.NEW, expect_operation=Operation.NONE,
                        status=status)
                    assert ws is not None
                cookie = signing.mint_cookie(keys, wid, ws.access_nonce, 3600, time.time())
                out[status].append((wid, f"{auth.COOKIE_NAME}={cookie}"))
    finally:
        await pool.close()
    return out[Status.RUNNING], out[Status.WARM]


def _measure_child(env: dict[str, str], port: int, running: tuple[str, str],
                   args: argparse.Namespace) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "measure", "--port", str(port),
         "--workspace", running[0], "--cookie", running[1], "--duration", str(args.duration),
         "--extra", str(args.extra_half_open)],
        env=env, capture_output=True, timeout=args.duration + 60, preexec_fn=_raise_nofile)
    if proc.returncode != 0:
        raise RuntimeError(f"measure failed: {proc.stderr.decode()[-3000:]}")
    result: dict[str, Any] = orjson.loads(proc.stdout)
    return result


def _child(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = tempfile.TemporaryFile()  # a pipe could fill up and stall the child  # noqa: SIM115 - closed by _log_of
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=log, preexec_fn=_raise_nofile)
    _LOGS[proc.pid] = log
    return proc


_LOGS: dict[int, IO[bytes]] = {}


def _log_of(proc: subprocess.Popen[bytes]) -> str:
    log = _LOGS.pop(proc.pid, None)
    if log is None:
        return ""
    log.seek(0)
    text = log.read().decode(errors="replace")
    log.close()
    return text


async def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"child exited early: {_log_of(proc)[-3000:]}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    _raise_nofile()
    running, warm = await _rows(args.database_url, args.workspaces, args.warm)
    env = dict(os.environ)
    env.setdefault("CODEHUB_LIMITS__HEADER_TIMEOUT", str(args.header_timeout))
    if args.events_poll_interval:
        env["CODEHUB_GATEWAY__EVENTS_POLL_INTERVAL"] = str(args.events_poll_interval)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    limit = int(env.get("CODEHUB_LIMITS__CONNECTIONS_PER_CLIENT", "256"))
    up_port, gw_port = _free_port(), _free_port()
    upstream = _child("serve-upstream", "--port", str(up_port), env=env)
    gw = _child("serve-gateway", "--database-url", args.database_url, "--port", str(gw_port),
                "--upstream-port", str(up_port), env=env)
    t = Tally()
    try:
        await _wait_port(up_port, upstream)
        await _wait_port(gw_port, gw)
        began = time.monotonic()
        stop = began + args.duration
        tasks = [
            well_behaved(gw_port, args.connections, running, args.interval, stop, t),
            asyncio.to_thread(_measure_child, env, gw_port, running[0], args),
            half_open(gw_port, limit, stop, t),
            slow_headers(gw_port, args.slow, args.slow_interval, stop, t),
            event_streams(gw_port, args.events, warm, stop, t),
        ]
        results = await asyncio.gather(*tasks)
        m = results[1]
        t.latencies, t.ready_ok, t.ready_errors = m["latencies"], m["ready_ok"], m["ready_errors"]
        t.half_open_refused_after = m["beyond"]
        t.probe_connect = m["probe_connect"]
        t.gap = m["gap"]
        for what, n in m["errors"].items():
            t.errors[what] = t.errors.get(what, 0) + n
        elapsed = time.monotonic() - began
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{gw_port}/metrics") as r:
            text = await r.text()
        refused = {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
                   for line in text.splitlines()
                   if line.startswith("codehub_connections_refused_total{")}
    finally:
        for proc in (gw, upstream):
            proc.send_signal(signal.SIGTERM)
        for proc in (gw, upstream):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        gw_log = _log_of(gw)
        _log_of(upstream)
    lat = t.latencies
    return {
        "duration_s": round(elapsed, 1),
        "well_behaved": {"connections": args.connections, "requests_ok": t.ok,
                         "errors": t.errors, "rate_per_s": round(t.ok / elapsed)},
        "measured": {"requests": len(lat),
                     "p50_ms": round(_percentile(lat, 50) * 1000, 2),
                     "p99_ms": round(_percentile(lat, 99) * 1000, 2),
                     "max_ms": round(max(lat) * 1000, 2) if lat else None,
                     "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else None,
                     "longest_without_success_s": round(t.gap, 2),
                     "readyz_ok": t.ready_ok, "readyz_errors": t.ready_errors},
        "half_open": _half_open_report(t, limit, args),
        "slow_headers": {"connections": args.slow, "dropped": len(t.slow_lived),
                         "lived_max_s": round(max(t.slow_lived, default=float("nan")), 2),
                         "lived_p50_s": round(_percentile(t.slow_lived, 50), 2)},
        "event_streams": {"connections": args.events, "answers": t.events_status,
                          "open_max": t.events_open_max},
        "refused_by_reason": refused,
        "gateway_log_tail": gw_log[-2000:] if t.errors else "",
    }


def _half_open_report(t: Tally, limit: int, args: argparse.Namespace) -> dict[str, Any]:
    """A probe beyond the limit is refused when the gateway closes it before half the header
    timeout; it is admitted instead when it came just as a holder's slot was freed (the
    holders are dropped by the header timeout and reopen), and then lives like a holder."""
    closes = t.half_open_refused_after
    refused = [c for c in closes if c < args.header_timeout / 2]
    admitted = [c for c in closes if c >= args.header_timeout / 2]
    return {"limit": limit, "probes": args.extra_half_open, "probe_attempts": len(closes),
            "refused": len(refused),
            "refused_closed_after_p50_ms": round(_percentile(refused, 50) * 1000, 2),
            "refused_closed_after_max_ms": round(max(refused, default=float("nan")) * 1000, 2),
            "admitted_as_a_slot_freed": len(admitted),
            "admitted_lived_max_s": round(max(admitted, default=0.0), 2),
            "probe_connect_max_s": round(max(t.probe_connect, default=float("nan")), 3),
            "holders_lived_max_s": round(max(t.half_open_lived, default=float("nan")), 2),
            "holders_dropped": len(t.half_open_lived)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--database-url", required=True)
    r.add_argument("--duration", type=float, default=60)
    r.add_argument("--connections", type=int, default=1000)
    r.add_argument("--interval", type=float, default=2.0,
                   help="seconds between a well-behaved connection's requests")
    r.add_argument("--workspaces", type=int, default=100)
    r.add_argument("--warm", type=int, default=10)
    r.add_argument("--extra-half-open", type=int, default=50)
    r.add_argument("--slow", type=int, default=2000)
    r.add_argument("--slow-interval", type=float, default=3.0)
    r.add_argument("--events", type=int, default=3000)
    r.add_argument("--header-timeout", type=float, default=10.0)
    r.add_argument("--events-poll-interval", type=float, default=0,
                   help="gateway.events_poll_interval for the gateway (0: its default)")
    u = sub.add_parser("serve-upstream")
    u.add_argument("--port", type=int, required=True)
    m = sub.add_parser("measure")
    m.add_argument("--port", type=int, required=True)
    m.add_argument("--workspace", required=True)
    m.add_argument("--cookie", required=True)
    m.add_argument("--duration", type=float, required=True)
    m.add_argument("--extra", type=int, required=True)
    g = sub.add_parser("serve-gateway")
    g.add_argument("--database-url", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--upstream-port", type=int, required=True)
    args = p.parse_args()
    if args.command == "serve-upstream":
        serve_upstream(args.port)
    elif args.command == "measure":
        sys.stdout.write(orjson.dumps(asyncio.run(measure(args))).decode())
    elif args.command == "serve-gateway":
        serve_gateway(args.database_url, args.port, args.upstream_port)
    else:
        report = asyncio.run(run(args))
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
                         .decode() + "\n")


if __name__ == "__main__":
    main()
