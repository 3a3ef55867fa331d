"""What the leader runs: workers over the work queue, fed by hints, resyncs and TTL sweeps.

Guarantees:
- `lead()` runs only while this replica holds leadership; cancelling it (leadership lost)
  stops every worker at once. A half-done action keeps its recorded operation and is
  resumed by the next leader.
- On becoming leader: orphans are reported and removed first (resources labelled as ours
  whose workspace has no row; never anything unlabelled), then every unsettled row (an
  operation set, or status != desired) is enqueued, which resumes interrupted actions.
- A hint enqueues its workspace; after every (re)subscription and every `resync_interval`
  all unsettled rows and all RUNNING rows are enqueued, so lost hints (Redis down) only
  cost latency and a container that died behind our back is noticed and restarted.
- Every `ttl_sweep_interval` the TTL sweep steps idle RUNNING rows down to WARM and idle
  WARM rows down to COLD (one indexed query each) and enqueues what it changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .. import constants
from ..clock import Clock
from ..interfaces import HintBus, InstanceController, ObjectStore, StorageProvider
from ..store import Store
from .reconciler import Reconciler
from .workqueue import WorkQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Schedule:
    workers: int = 4
    resync_interval: float = 30.0
    ttl_sweep_interval: float = 30.0
    default_warm_ttl: int = 1800
    default_cold_ttl: int = 7 * 86400
    backoff_base: float = 1.0
    backoff_max: float = 300.0


@dataclass(kw_only=True, eq=False)
class Controller:
    """The leader's loop (`lead`): workers, hints, resyncs and TTL sweeps feeding one queue.
    `queue` is the queue while leading, else None."""

    reconciler: Reconciler
    store: Store
    hints: HintBus
    instances: InstanceController
    storage: StorageProvider
    objects: ObjectStore | None
    clock: Clock
    schedule: Schedule
    queue: WorkQueue[str] | None = field(default=None, init=False)

    async def lead(self) -> None:
        q: WorkQueue[str] = WorkQueue(clock=self.clock, backoff_base=self.schedule.backoff_base,
                                      backoff_max=self.schedule.backoff_max)
        self.queue = q
        try:
            await self.remove_orphans()
            await self.resync(q)
            async with asyncio.TaskGroup() as tg:
                for i in range(self.schedule.workers):
                    tg.create_task(self._worker(q), name=f"codehub-worker-{i}")
                tg.create_task(self._listen(q), name="codehub-hints")
                tg.create_task(self._every(self.schedule.resync_interval, self.resync, q),
                               name="codehub-resync")
                tg.create_task(self._every(self.schedule.ttl_sweep_interval, self.sweep, q),
                               name="codehub-ttl")
        finally:
            await q.shutdown(drain=False)
            self.queue = None

    async def resync(self, q: WorkQueue[str]) -> None:
        for wid in await self.store.resync_ids():
            q.add(wid)

    async def sweep(self, q: WorkQueue[str]) -> list[str]:
        now = self.clock.now()
        stepped = await self.store.sweep_warm(now, self.schedule.default_warm_ttl)
        stepped += await self.store.sweep_cold(now, self.schedule.default_cold_ttl)
        for wid in stepped:
            log.info("workspace %s idle past its TTL: stepping down", wid)
            q.add(wid)
            await self.hints.publish(wid)
        return stepped

    async def remove_orphans(self) -> list[str]:
        """Remove managed resources whose workspace has no row. Lists resources BEFORE
        reading rows: a row is always written before its resources, so a resource made
        meanwhile always finds its row."""
        containers = await self.instances.list_managed()
        volumes = await self.storage.list_managed()
        archives = [] if self.objects is None else await self.objects.list_keys()
        known = await self.store.all_ids()
        removed = []
        for r in containers:
            if r.workspace_id not in known:
                log.warning("orphan container %s (workspace %s has no row): removing",
                            r.name, r.workspace_id)
                await self.instances.delete(r.workspace_id)
                removed.append(r.name)
        for r in volumes:
            if r.workspace_id not in known:
                log.warning("orphan %s %s (workspace %s has no row): removing", r.kind,
                            r.name, r.workspace_id)
                await self.storage.delete_volume(r.workspace_id, r.name)
                removed.append(r.name)
        for key in archives:
            wid = key.split("/", 1)[0]
            if wid not in known and key == constants.archive_key(wid):
                log.warning("orphan archive %s (workspace %s has no row): removing", key, wid)
                await self.storage.delete_archive(wid, key)
                removed.append(key)
        return removed

    async def _worker(self, q: WorkQueue[str]) -> None:
        while (wid := await q.get()) is not None:
            try:
                result = await self.reconciler.reconcile(wid)
            except Exception:  # a bug or a database hiccup: retry with backoff
                delay = q.add_rate_limited(wid)
                log.exception("reconcile %s raised; retrying in %.1fs", wid, delay)
            else:
                if result.requeue_after is None:
                    q.forget(wid)
                elif result.requeue_after <= 0:
                    q.forget(wid)
                    q.add(wid)
                else:
                    q.add_after(wid, result.requeue_after)
            finally:
                q.done(wid)

    async def _listen(self, q: WorkQueue[str]) -> None:
        async for wid in self.hints.subscribe():
            if wid is None:
                await self.resync(q)
            else:
                q.add(wid)

    async def _every(self, interval: float,
                     fn: Callable[[WorkQueue[str]], Awaitable[object]],
                     q: WorkQueue[str]) -> None:
        while True:
            await self.clock.sleep(interval)
            try:
                await fn(q)
            except Exception:
                log.exception("periodic %s failed; next try in %gs",
                              getattr(fn, "__name__", fn), interval)
