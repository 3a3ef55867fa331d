"""reconcile(workspace_id): one step of convergence, crash-safe at every line.

Guarantees:
- Level-triggered: each call reads the row and the observed runtime, lets the pure
  `model.decide()` pick ONE step, and acts on it. Calling it again is always safe.
- The operation is recorded (compare-and-set) BEFORE the external action starts, and
  cleared in the same write that records the new status. A process killed anywhere in
  between leaves the operation set; the next call re-runs the action, which is idempotent.
- Archive: the volume is deleted only after the archive was verified by the storage
  provider AND its key, size and checksum were committed to the row (together with the
  checkpoint `Checkpoint.ARCHIVE_COMMITTED`, so a re-run after a crash during the
  volume deletion does not try to archive a volume that is already gone). The
  checkpoint is cleared when an operation is recorded and when it finishes.
- Restore: the new volume is committed to the row only after it was filled from an archive
  whose checksum verified; the archive is kept.
- A failure is recorded on the row (message, count, next retry) and retried with capped
  exponential backoff derived from the row's error count (so it survives a new leader).
  A non-retryable failure, or `max_failures` of them, puts the workspace in ERROR, where
  it waits for an admin; a DELETE is retried regardless.
- An action that reports no progress for `stuck_timeout` seconds is cancelled and counted
  as a failure, never left hanging.
- Progress is written to the row at most once per `progress_write_interval` (on the
  injected clock): the one progress throttle. Adapters report every step unthrottled, so
  every report also counts as a sign of life for `stuck_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson

from .. import constants, metrics
from ..clock import Clock
from ..failpoints import failpoint
from ..interfaces import InstanceController, Progress, StorageProvider
from ..model import (
    NOT_OBSERVED,
    TRANSITIONS,
    Checkpoint,
    Observed,
    Operation,
    Status,
    Step,
    VolumeState,
    Workspace,
)
from ..store import Store

log = logging.getLogger(__name__)


REMOVING_VOLUME = "removing volume"  # the progress a user sees once the archive is committed


@dataclass(frozen=True, slots=True)
class Result:
    """None: converged, nothing to do. 0: look again now. >0: look again after a delay."""

    requeue_after: float | None = None
    failed: bool = False


CONVERGED = Result()
AGAIN = Result(0.0)


@dataclass(frozen=True, slots=True)
class Policy:
    max_failures: int = 8
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    stuck_timeout: float = 900.0
    progress_write_interval: float = 1.0

    def backoff(self, failures: int) -> float:
        return float(min(self.backoff_max, self.backoff_base * 2 ** min(failures - 1, 62)))


_Report = Callable[[Progress], Awaitable[None]]


@dataclass(slots=True)
class _Watch:
    last_progress: float


class StuckOperation(Exception):
    """An action made no progress for `stuck_timeout` seconds."""


class EventLog:
    """Append-only JSON lines of every action's begin and end (for audits and tests).

    One `write()` per line on an O_APPEND descriptor: lines from several processes never
    interleave."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, **fields: Any) -> None:
        os.write(self._fd, orjson.dumps(fields) + b"\n")

    def close(self) -> None:
        os.close(self._fd)


@dataclass(kw_only=True, eq=False)
class Reconciler:
    """Observe, decide, act, record, for one workspace at a time (`reconcile`)."""

    store: Store
    instances: InstanceController
    storage: StorageProvider
    clock: Clock
    policy: Policy
    on_change: Callable[[str], Awaitable[None]] | None = None
    events: EventLog | None = None

    async def reconcile(self, workspace_id: str) -> Result:
        row = await self.store.get(workspace_id)
        if row is None:
            return CONVERGED
        now = self.clock.now()
        if row.error_count and row.next_retry_at is not None and row.next_retry_at > now:
            return Result((row.next_retry_at - now).total_seconds())
        observed = await self._observe(row)
        step = row.next_step(observed)
        if step is Step.NOTHING:
            await self._settle(row)
            return CONVERGED
        if step is Step.FAIL:
            await self._fail_vanished(row)
            return CONVERGED
        transition = TRANSITIONS[step]
        if row.operation is not transition.operation:
            if row.operation is Operation.NONE:
                metrics.HINT_LAG.observe(max(0.0, (now - row.updated_at).total_seconds()))
            began = await self.store.compare_and_set(
                row.id, expect_status=row.status, expect_operation=row.operation,
                operation=transition.operation, operation_started_at=now, checkpoint=None,
                progress_phase=None, progress_done=None, progress_total=None)
            if began is None:
                return AGAIN  # the row moved on under us: decide afresh
            row = began
        failpoint(f"reconcile.{step.value.lower()}.recorded")
        self._event("begin", row, step)
        try:
            with metrics.operation(transition.operation.value):
                await self._act(step, row)
        except asyncio.CancelledError:
            self._event("cancelled", row, step)
            raise
        except Exception as exc:  # every failure is recorded, whatever raised it
            self._event("failed", row, step, error=str(exc))
            return await self._failed(row, exc)
        self._event("end", row, step)
        await self._changed(row.id)
        return AGAIN

    # -- observing and settling --------------------------------------------------------

    async def _observe(self, row: Workspace) -> Observed:
        if row.operation is not Operation.NONE or row.status not in (Status.WARM,
                                                                     Status.RUNNING):
            return NOT_OBSERVED
        instance = (await self.instances.get_status(row.id)).state
        volume = VolumeState.MISSING
        if row.home_store_key:
            volume = await self.storage.get_volume_status(row.id, row.home_store_key)
        return Observed(instance=instance, volume=volume)

    async def _settle(self, row: Workspace) -> None:
        """Converged: record the generation seen and clear a past error. An ERROR row
        keeps its error for the admin."""
        if row.status is Status.ERROR or (row.observed_generation == row.generation
                                          and not row.error_count):
            return
        await self.store.compare_and_set(
            row.id, expect_status=row.status, expect_operation=row.operation,
            observed_generation=row.generation, error_count=0, error_message=None,
            error_at=None, next_retry_at=None)

    async def _fail_vanished(self, row: Workspace) -> None:
        message = (f"home volume {row.home_store_key or '(none recorded)'} is missing; "
                   "refusing to provision an empty one over the user's data")
        log.error("workspace %s: %s", row.id, message)
        await self.store.compare_and_set(
            row.id, expect_status=row.status, expect_operation=row.operation,
            status=Status.ERROR, error_from_status=row.status, error_message=message,
            error_count=row.error_count + 1, error_at=self.clock.now())
        await self._changed(row.id)

    async def _failed(self, row: Workspace, exc: Exception) -> Result:
        count = row.error_count + 1
        retryable = getattr(exc, "retryable", True)
        give_up = (not retryable or count >= self.policy.max_failures)
        delay = self.policy.backoff(count)
        now = self.clock.now()
        message = f"{row.operation.value.lower()} failed: {exc}" if str(exc) else \
            f"{row.operation.value.lower()} failed: {type(exc).__name__}"
        changes: dict[str, Any] = dict(error_message=message[:2000], error_count=count,
                                       error_at=now,
                                       next_retry_at=now + timedelta(seconds=delay))
        if give_up and row.operation is not Operation.DELETING and row.status is not \
                Status.ERROR:
            changes.update(status=Status.ERROR, error_from_status=row.status)
            log.error("workspace %s: %s (giving up after %d failure(s); waits for an admin)",
                      row.id, message, count)
        else:
            log.warning("workspace %s: %s (failure %d, retry in %.1fs)", row.id, message,
                        count, delay)
        await self.store.compare_and_set(row.id, expect_status=row.status,
                                         expect_operation=row.operation, **changes)
        await self._changed(row.id)
        return Result(delay, failed=True)

    async def _changed(self, workspace_id: str) -> None:
        if self.on_change is not None:
            await self.on_change(workspace_id)

    def _event(self, phase: str, row: Workspace, step: Step, **extra: Any) -> None:
        if self.events is not None:
            self.events.write(t=self.clock.now().isoformat(), pid=os.getpid(),
                              workspace=row.id, step=step.value, phase=phase, **extra)

    # -- acting ------------------------------------------------------------------------

    async def _act(self, step: Step, row: Workspace) -> None:
        """Run the step's action; cancel it if it reports no progress for stuck_timeout."""
        handler = {
            Step.PROVISION: self._provision, Step.START: self._start, Step.STOP: self._stop,
            Step.ARCHIVE: self._archive, Step.RESTORE: self._restore,
            Step.DELETE: self._delete,
        }[step]
        watch = _Watch(self.clock.monotonic())
        task = asyncio.ensure_future(handler(row, self._progress_writer(row, watch)))
        check = min(1.0, self.policy.stuck_timeout / 4)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=check)
                if done:
                    task.result()
                    return
                if self.clock.monotonic() - watch.last_progress > self.policy.stuck_timeout:
                    raise StuckOperation(
                        f"no progress for {self.policy.stuck_timeout:g}s; cancelled")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _progress_writer(self, row: Workspace, watch: _Watch) -> _Report:
        last_write = float("-inf")

        async def report(p: Progress) -> None:
            nonlocal last_write
            now = self.clock.monotonic()
            watch.last_progress = now
            if now - last_write < self.policy.progress_write_interval:
                return
            last_write = now
            await self.store.compare_and_set(
                row.id, expect_status=row.status, expect_operation=row.operation,
                progress_phase=p.phase, progress_done=p.done, progress_total=p.total)
        return report

    async def _finish(self, row: Workspace, status: Status, **changes: Any) -> None:
        done = await self.store.compare_and_set(
            row.id, expect_status=row.status, expect_operation=row.operation,
            status=status, operation=Operation.NONE, operation_started_at=None,
            checkpoint=None, progress_phase=None, progress_done=None, progress_total=None,
            error_count=0, error_message=None, error_at=None, next_retry_at=None,
            **changes)
        if done is None:
            raise RuntimeError(f"workspace {row.id} changed while {row.operation} ran")

    async def _provision(self, row: Workspace, progress: _Report) -> None:
        key = await self.storage.provision(row.id, _size_limit(row))
        await self._finish(row, Status.WARM, home_store_key=key)

    async def _start(self, row: Workspace, progress: _Report) -> None:
        if not row.home_store_key:
            raise RuntimeError("no home volume recorded; cannot start")
        await self.instances.start(row.id, row.image_ref, row.home_store_key)
        await self._finish(row, Status.RUNNING)

    async def _stop(self, row: Workspace, progress: _Report) -> None:
        await self.instances.stop(row.id)
        await self._finish(row, Status.WARM)

    async def _archive(self, row: Workspace, progress: _Report) -> None:
        if not row.home_store_key:
            raise RuntimeError("no home volume recorded; nothing to archive")
        committed: Workspace | None = row
        if row.checkpoint is not Checkpoint.ARCHIVE_COMMITTED:
            info = await self.storage.archive(row.id, row.home_store_key, progress)
            committed = await self.store.compare_and_set(
                row.id, expect_status=row.status, expect_operation=row.operation,
                archive_key=info.key, archive_size=info.size, archive_sha256=info.sha256,
                archive_created_at=info.created_at, checkpoint=Checkpoint.ARCHIVE_COMMITTED,
                progress_phase=REMOVING_VOLUME,
                progress_done=info.size, progress_total=info.size)
            if committed is None:
                raise RuntimeError(f"workspace {row.id} changed while archiving")
            metrics.BYTES_ARCHIVED.inc(info.size)
            failpoint("reconcile.archive.committed")
        # else: a previous run committed this operation's archive and died before (or
        # while) deleting the volume; only that is left to do.
        assert committed is not None
        # Only now, with a verified archive on record, may the volume go.
        await self.storage.delete_volume(row.id, row.home_store_key)
        failpoint("reconcile.archive.volume_deleted")
        await self._finish(committed, Status.COLD, home_store_key=None)

    async def _restore(self, row: Workspace, progress: _Report) -> None:
        if not row.archive_key or not row.archive_sha256:
            raise RuntimeError("no archive recorded; nothing to restore")
        key = await self.storage.restore(row.id, row.archive_key, row.archive_sha256,
                                         progress, size_limit=_size_limit(row))
        metrics.BYTES_RESTORED.inc(row.archive_size or 0)
        failpoint("reconcile.restore.returned")
        await self._finish(row, Status.WARM, home_store_key=key)

    async def _delete(self, row: Workspace, progress: _Report) -> None:
        await self.instances.delete(row.id)
        volumes = {r.name for r in await self.storage.list_managed(row.id)
                   if r.kind == "volume"}
        if row.home_store_key:
            volumes.add(row.home_store_key)
        for name in sorted(volumes):
            await self.storage.delete_volume(row.id, name)
        await self.storage.delete_archive(row.id, row.archive_key or constants.archive_key(row.id))
        failpoint("reconcile.delete.purged")
        await self._finish(row, Status.DELETED, home_store_key=None, archive_key=None,
                           archive_size=None, archive_sha256=None, archive_created_at=None)
        await self.store.delete_row(row.id, expect_status=Status.DELETED)


def _size_limit(row: Workspace) -> int | None:
    """The workspace's own home size in bytes; None: the storage's default."""
    return None if row.home_size_limit_mib is None else row.home_size_limit_mib << 20
