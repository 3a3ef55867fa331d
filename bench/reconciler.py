"""Reconciler benchmark: resync tick, TTL sweep and hint-to-action latency at 10,000 rows.

    .venv/bin/python bench/reconciler.py [--rows 10000] [--runs 30]

Uses a real PostgreSQL (CODEHUB_BENCH_DATABASE_URL, else an embedded one in a temp dir)
and a real Redis when `redis-server` is on PATH (else only the in-process bus). What is
measured is CodeHub's own work: the queries and the queue. The reconcile step itself is
replaced by a recorder (the Docker/S3 actions have benchmarks of their own), so the hint
latency is publish -> reconcile() entered.

Goals (issue 4): resync tick <= 200 ms, TTL sweep <= 50 ms at 10,000 rows. Each figure is
printed with its ratio to the goal and to a reference measured in the same run: a plain
`SELECT count(*)` over the same table.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from codehub import store as store_mod
from codehub.clock import SystemClock
from codehub.hints import InProcessHintBus, RedisHintBus
from codehub.interfaces import HintBus
from codehub.postgres import EmbeddedPostgres
from codehub.reconciler.controller import Controller, Schedule
from codehub.reconciler.reconciler import CONVERGED, Result
from codehub.reconciler.workqueue import WorkQueue
from codehub.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tools import ensure_tools


class Recorder:
    """Stands in for Reconciler.reconcile: records when each workspace was picked up."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Future[None]] = {}

    async def reconcile(self, workspace_id: str) -> Result:
        self.seen[workspace_id] = time.perf_counter()
        fut = self.waiters.pop(workspace_id, None)
        if fut is not None and not fut.done():
            fut.set_result(None)
        return CONVERGED


async def fill(pool: asyncpg.Pool, rows: int) -> None:
    """60% COLD, 30% WARM, 9% RUNNING (settled), 1% with work to do."""
    now = datetime.now(UTC)
    ids, status, desired, last = [], [], [], []
    for i in range(rows):
        r = i % 100
        s = "COLD" if r < 60 else "WARM" if r < 90 else "RUNNING" if r < 99 else "NEW"
        d = "RUNNING" if s == "NEW" else s
        ids.append(f"ws-{i:06d}")
        status.append(s)
        desired.append(d)
        last.append(now - timedelta(seconds=i % 600))  # all recently active
    await pool.execute("TRUNCATE workspaces")
    await pool.execute(
        "INSERT INTO workspaces (id, owner, image_ref, status, desired_state, last_access_at)"
        " SELECT u.id, 'bench', 'img', u.s, u.d, u.t"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) AS u(id, s, d, t)",
        ids, status, desired, last)
    await pool.execute("ANALYZE workspaces")


def timed_ms(samples: list[float]) -> str:
    return (f"p50 {statistics.median(samples) * 1e3:7.2f} ms  "
            f"p95 {sorted(samples)[int(len(samples) * 0.95) - 1] * 1e3:7.2f} ms")


async def measure(fn: object, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return out


async def hint_latency(bus: HintBus, store: Store, rounds: int) -> list[float]:
    recorder = Recorder()
    controller = Controller(reconciler=recorder, store=store, hints=bus,  # type: ignore[arg-type]
                            instances=None, storage=None, objects=None,  # type: ignore[arg-type]
                            clock=SystemClock(),
                            schedule=Schedule(workers=4, resync_interval=3600,
                                              ttl_sweep_interval=3600))
    controller.remove_orphans = _no_orphans  # type: ignore[method-assign]
    task = asyncio.create_task(controller.lead())
    await asyncio.sleep(1.0)  # initial resync drained
    loop = asyncio.get_running_loop()
    out = []
    for i in range(rounds):
        wid = f"ws-{(i * 37) % 9000:06d}"  # settled rows: only the hint brings them in
        fut = loop.create_future()
        recorder.waiters[wid] = fut
        t0 = time.perf_counter()
        await bus.publish(wid)
        await asyncio.wait_for(fut, 5)
        out.append(recorder.seen[wid] - t0)
        await asyncio.sleep(0.005)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return out


async def _no_orphans() -> list[str]:
    return []


@asynccontextmanager
async def redis_bus() -> AsyncIterator[HintBus | None]:
    ensure_tools({"redis-server": "redis-server"})
    exe = shutil.which("redis-server")
    if exe is None:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    bus = RedisHintBus(f"redis://127.0.0.1:{port}/0")
    try:
        for _ in range(50):
            if await bus.ping():
                break
            await asyncio.sleep(0.1)
        yield bus
    finally:
        await bus.close()
        proc.terminate()
        proc.wait()


async def main(rows: int, runs: int, url: str | None) -> None:
    tmp = None
    server = None
    if url is None:
        tmp = tempfile.mkdtemp(prefix="codehub-bench-")
        server = EmbeddedPostgres(Path(tmp) / "pg")
        url = await asyncio.to_thread(server.start)
    pool = await asyncpg.create_pool(url, min_size=2, max_size=8)
    try:
        async with pool.acquire() as conn:
            await conn.execute("DROP TABLE IF EXISTS workspaces, schema_migrations")
            await store_mod.migrate(conn)
        await fill(pool, rows)
        store = Store(pool)
        bus = InProcessHintBus()
        controller = Controller(reconciler=Recorder(), store=store, hints=bus,  # type: ignore[arg-type]
                                instances=None, storage=None, objects=None,  # type: ignore[arg-type]
                                clock=SystemClock(), schedule=Schedule())
        q: WorkQueue[str] = WorkQueue()

        async def count() -> None:
            await pool.fetchval("SELECT count(*) FROM workspaces")

        async def tick() -> None:
            await controller.resync(q)
            while len(q):  # drain what the tick enqueued, as workers would
                item = await q.get()
                q.done(item)  # type: ignore[arg-type]

        async def sweep() -> None:
            await controller.sweep(q)

        ref = await measure(count, runs)
        ticks = await measure(tick, runs)
        sweeps = await measure(sweep, runs)
        enqueued = len(await store.resync_ids())
        # a sweep that does step rows down: 1% of the RUNNING rows idle past their TTL
        await pool.execute("UPDATE workspaces SET last_access_at = now() - interval '2 hours'"
                           " WHERE status = 'RUNNING' AND right(id, 2) = '91'")
        t0 = time.perf_counter()
        stepped = await controller.sweep(q)
        stepping = time.perf_counter() - t0

        ref50 = statistics.median(ref)
        print(f"rows: {rows}  runs: {runs}  (resync enqueues {enqueued} rows: unsettled + "
              "RUNNING)")
        print(f"reference SELECT count(*):      {timed_ms(ref)}")
        for name, samples, goal in (("resync tick (query+enqueue)", ticks, 0.200),
                                    ("TTL sweep, nothing idle", sweeps, 0.050)):
            p50 = statistics.median(samples)
            print(f"{name:<31} {timed_ms(samples)}  = {p50 / goal:.2f}x goal "
                  f"({goal * 1e3:.0f} ms), {p50 / ref50:.1f}x reference")
        print(f"TTL sweep stepping {len(stepped):>3} rows:   {stepping * 1e3:7.2f} ms  "
              f"= {stepping / 0.050:.2f}x goal (50 ms)")
        await pool.execute("UPDATE workspaces SET last_access_at = now()")
        for label, make in (("in-process", lambda: _null(bus)), ("redis", redis_bus)):
            async with make() as b:
                if b is None:
                    print(f"hint -> action ({label}): skipped (no redis-server on PATH)")
                    continue
                lat = await hint_latency(b, store, runs * 3)
                print(f"hint -> action ({label}):{' ' * (12 - len(label))}"
                      f"{timed_ms(lat)}")
    finally:
        await pool.close()
        if server is not None:
            await asyncio.to_thread(server.stop)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@asynccontextmanager
async def _null(bus: HintBus) -> AsyncIterator[HintBus]:
    yield bus


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--database-url", default=None,
                   help="default: $CODEHUB_BENCH_DATABASE_URL, else an embedded server")
    a = p.parse_args()
    import os
    asyncio.run(main(a.rows, a.runs, a.database_url or os.environ.get(
        "CODEHUB_BENCH_DATABASE_URL")))
