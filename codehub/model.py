"""The workspace state machine, as pure data and functions.

Guarantees:
- This module imports nothing of CodeHub's and performs no I/O: every decision the
  reconciler takes is a function of (desired_state, status, operation, observed runtime).
- `decide()` is total: it returns a `Step` for every combination of its inputs.
- An operation recorded on a row (the process died while it ran) is always resumed before
  anything else happens, unless the workspace is being deleted (deleting is idempotent and
  subsumes every other half-done action) or is in ERROR (it waits for an admin, who
  returns it to `error_from_status`; the operation is then resumed).
- Nothing here ever chooses to re-provision a volume that a workspace already had: a home
  that vanished is an error for a person to look at, never silently replaced.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime

# What a workspace id may be, everywhere (API, gateway, runtime and storage names): a DNS
# label, so that `{id}.ws.example.com` is a host name and every Docker or Kubernetes name
# derived from it is valid. Use with fullmatch.
WORKSPACE_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class DesiredState(enum.StrEnum):
    """What an admin (or the TTL sweep, or an auto-wake) asked for."""

    RUNNING = "RUNNING"
    WARM = "WARM"
    COLD = "COLD"
    DELETED = "DELETED"


class Status(enum.StrEnum):
    """The tier a workspace was last seen converged to."""

    NEW = "NEW"  # a row exists, nothing was provisioned yet
    WARM = "WARM"  # volume, no container
    RUNNING = "RUNNING"  # volume and a healthy container
    COLD = "COLD"  # archive in object storage, no volume
    ERROR = "ERROR"  # gave up; waits for an admin
    DELETED = "DELETED"  # everything purged; the row is about to go


class Operation(enum.StrEnum):
    """An external action in flight. Written before it starts, cleared with its result."""

    NONE = "NONE"
    PROVISIONING = "PROVISIONING"
    STARTING = "STARTING"
    STOPPING = "STOPPING"
    ARCHIVING = "ARCHIVING"
    RESTORING = "RESTORING"
    DELETING = "DELETING"


class Checkpoint(enum.StrEnum):
    """How far an operation in flight got, recorded with the result it committed, so that
    a re-run after a crash resumes from there instead of redoing the step. Cleared with
    the operation."""

    ARCHIVE_COMMITTED = "ARCHIVE_COMMITTED"  # the verified archive is on the row; only
    # deleting the volume is left


class InstanceState(enum.StrEnum):
    """What the runtime reports about a workspace's container."""

    RUNNING = "RUNNING"  # up and answering its health check
    STARTING = "STARTING"  # up, health check not yet passing
    STOPPED = "STOPPED"  # exists, not running (exited cleanly or created)
    FAILED = "FAILED"  # exited with a non-zero code
    MISSING = "MISSING"  # no container


class VolumeState(enum.StrEnum):
    """What the storage provider reports about a workspace's home volume."""

    PRESENT = "PRESENT"
    MISSING = "MISSING"


class Step(enum.StrEnum):
    """The one next action `decide()` picks."""

    NOTHING = "NOTHING"  # converged (or waiting for an admin)
    PROVISION = "PROVISION"
    START = "START"
    STOP = "STOP"
    ARCHIVE = "ARCHIVE"
    RESTORE = "RESTORE"
    DELETE = "DELETE"
    FAIL = "FAIL"  # observed state contradicts the row in a way only a person may fix


@dataclass(frozen=True, slots=True)
class Transition:
    """How a step is carried out: the operation recorded first, the status written after."""

    operation: Operation
    success: Status


TRANSITIONS: dict[Step, Transition] = {
    Step.PROVISION: Transition(Operation.PROVISIONING, Status.WARM),
    Step.START: Transition(Operation.STARTING, Status.RUNNING),
    Step.STOP: Transition(Operation.STOPPING, Status.WARM),
    Step.ARCHIVE: Transition(Operation.ARCHIVING, Status.COLD),
    Step.RESTORE: Transition(Operation.RESTORING, Status.WARM),
    Step.DELETE: Transition(Operation.DELETING, Status.DELETED),
}

STEP_OF_OPERATION: dict[Operation, Step] = {t.operation: s for s, t in TRANSITIONS.items()}


@dataclass(frozen=True, slots=True)
class Observed:
    """The runtime as the reconciler saw it just before deciding. None = not looked at."""

    instance: InstanceState | None = None
    volume: VolumeState | None = None


NOT_OBSERVED = Observed()

# For each desired state, the step that moves a settled status one tier towards it.
# DELETED is handled before the table is consulted. ERROR waits for an admin.
_TOWARDS: dict[tuple[Status, DesiredState], Step] = {
    (Status.NEW, DesiredState.RUNNING): Step.PROVISION,
    (Status.NEW, DesiredState.WARM): Step.PROVISION,
    (Status.NEW, DesiredState.COLD): Step.PROVISION,
    (Status.WARM, DesiredState.RUNNING): Step.START,
    (Status.WARM, DesiredState.WARM): Step.NOTHING,
    (Status.WARM, DesiredState.COLD): Step.ARCHIVE,
    (Status.RUNNING, DesiredState.RUNNING): Step.NOTHING,
    (Status.RUNNING, DesiredState.WARM): Step.STOP,
    (Status.RUNNING, DesiredState.COLD): Step.STOP,
    (Status.COLD, DesiredState.RUNNING): Step.RESTORE,
    (Status.COLD, DesiredState.WARM): Step.RESTORE,
    (Status.COLD, DesiredState.COLD): Step.NOTHING,
}


def decide(
    desired: DesiredState,
    status: Status,
    operation: Operation,
    observed: Observed = NOT_OBSERVED,
) -> Step:
    """Pick the one next step for a workspace. Pure and total."""
    if status is Status.DELETED:
        return Step.NOTHING
    if desired is DesiredState.DELETED:
        return Step.DELETE
    if status is Status.ERROR:
        return Step.NOTHING  # waits for an admin; a failed operation stays recorded
    if operation is not Operation.NONE:
        return STEP_OF_OPERATION[operation]
    drift = _drift(desired, status, observed)
    if drift is not None:
        return drift
    return _TOWARDS[(status, desired)]


_DEAD = (InstanceState.MISSING, InstanceState.FAILED, InstanceState.STOPPED)


def _drift(desired: DesiredState, status: Status, observed: Observed) -> Step | None:
    """Correct a runtime that no longer matches a settled row, or refuse to guess."""
    if status in (Status.WARM, Status.RUNNING) and observed.volume is VolumeState.MISSING:
        return Step.FAIL  # the home is gone: never provision a blank one over it
    if (status is Status.RUNNING and desired is DesiredState.RUNNING
            and observed.instance in _DEAD):
        return Step.START  # the container died behind our back: bring it back
    if status is Status.WARM and observed.instance not in (None, InstanceState.MISSING):
        return Step.STOP  # WARM has no container: remove a stray one
    return None


def is_converged(desired: DesiredState, status: Status, operation: Operation) -> bool:
    """True when the row needs no action (ignoring runtime drift)."""
    return decide(desired, status, operation) is Step.NOTHING


# The tiers a person or an admin may ask for, lowest first: asking for a higher one restarts
# the idle time (a restored workspace is not swept straight back to COLD).
TIER = {DesiredState.DELETED: 0, DesiredState.COLD: 1, DesiredState.WARM: 2,
        DesiredState.RUNNING: 3}
_UP = (DesiredState.RUNNING, DesiredState.WARM)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a wish cannot be written now: a stable code and a sentence for people."""

    code: str
    message: str


def _deleting(ws: Workspace) -> Refusal | None:
    if ws.desired_state is DesiredState.DELETED or ws.status is Status.DELETED:
        return Refusal("deleting", f"workspace {ws.id} is being deleted")
    return None


def restore_needed(ws: Workspace) -> bool:
    """COLD, or on its way there, and nobody asked for a restore yet."""
    settled = ws.error_from_status if ws.status is Status.ERROR else ws.status
    return ws.desired_state is DesiredState.COLD and (
        settled is Status.COLD or ws.operation is Operation.ARCHIVING)


def desire_refusal(ws: Workspace, desired: DesiredState | None) -> Refusal | None:
    """Whether `desired` (None: only settings change) may be asked of `ws` now (shared by
    the admin API's PATCH and the self-service page): never of a workspace being deleted,
    and RUNNING or WARM of an archived one only through a restore."""
    refusal = _deleting(ws)
    if refusal is None and desired in _UP and restore_needed(ws):
        if ws.operation is Operation.ARCHIVING:
            return Refusal("restore_required", f"workspace {ws.id} is being archived; once "
                           "it is COLD it comes back only through a restore")
        return Refusal("restore_required",
                       f"workspace {ws.id} is archived (COLD); it comes back only through a "
                       "restore")
    return refusal


def restore_refusal(ws: Workspace) -> Refusal | None:
    """Whether a restore may be asked of `ws` now: only of a COLD one, not in ERROR."""
    refusal = _deleting(ws)
    if refusal is not None:
        return refusal
    if ws.status is Status.ERROR:
        return Refusal("in_error", f"workspace {ws.id} is in ERROR ({ws.error_message}); it "
                       "must be retried first")
    if ws.status is not Status.COLD:
        return Refusal("not_cold", f"workspace {ws.id} is {ws.status.value}; only a COLD "
                       "workspace can be restored")
    return None


@dataclass(frozen=True, slots=True)
class Archive:
    """A workspace's archive in object storage (the one a restore reads)."""

    key: str
    size: int | None
    sha256: str | None
    created_at: datetime | None


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a workspace's last attempts failed, how often in a row, and when last."""

    message: str
    count: int
    at: datetime | None


@dataclass(frozen=True, slots=True)
class Progress:
    """How far the operation in flight is: `done` (0 before anything was counted) of
    `total` (None: not known) in `phase`'s own unit (bytes for archive and restore). What
    an adapter reports (interfaces.ProgressCallback) and what a row shows."""

    phase: str
    done: int
    total: int | None


@dataclass(frozen=True, slots=True)
class Workspace:
    """One row of the `workspaces` table."""

    id: str
    owner: str
    image_ref: str
    desired_state: DesiredState
    status: Status
    operation: Operation
    operation_started_at: datetime | None
    home_store_key: str | None
    archive_key: str | None
    archive_size: int | None
    archive_sha256: str | None
    archive_created_at: datetime | None
    last_access_at: datetime
    warm_ttl_seconds: int | None
    cold_ttl_seconds: int | None
    error_message: str | None
    error_from_status: Status | None
    error_count: int
    error_at: datetime | None
    next_retry_at: datetime | None
    progress_phase: str | None
    progress_done: int | None
    progress_total: int | None
    generation: int
    observed_generation: int
    created_at: datetime
    updated_at: datetime
    home_size_limit_mib: int | None = None  # None: the global default
    # Part of every access link and cookie of this workspace (signing.py): made with
    # the row, replaced by revoke-access.
    access_nonce: str = ""
    checkpoint: Checkpoint | None = None

    def next_step(self, observed: Observed = NOT_OBSERVED) -> Step:
        return decide(self.desired_state, self.status, self.operation, observed)

    @property
    def archive(self) -> Archive | None:
        if self.archive_key is None:
            return None
        return Archive(self.archive_key, self.archive_size, self.archive_sha256,
                       self.archive_created_at)

    @property
    def failure(self) -> Failure | None:
        if self.error_message is None:
            return None
        return Failure(self.error_message, self.error_count, self.error_at)

    @property
    def progress(self) -> Progress | None:
        if self.progress_phase is None:
            return None
        return Progress(self.progress_phase, self.progress_done or 0, self.progress_total)
