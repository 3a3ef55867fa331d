"""The seams between CodeHub's core and the outside world.

The reconciler, the gateway and the API depend on these abstractions only; `app.py`
chooses the concrete classes. M3 (Kubernetes) swaps implementations, nothing above.

Contract shared by every method of InstanceController and StorageProvider: it is
idempotent. Calling it again after it succeeded, or after the process died at any point
inside it, is safe and ends in the same state as one successful call.

Guarantees:
- Every adapter (InstanceController, StorageProvider, ObjectStore) has a lifetime:
  `async with adapter:` opens it (`open()`: clients, sessions, directories it needs) and
  leaving the block closes it (`close()`: releases what it opened, also when the block
  raised). Both are idempotent; a closed adapter may be opened again. An adapter releases
  only what it opened itself, never what it was given (an engine client, another adapter).
  The composition root enters each adapter once and finds no closer by itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self

from .model import InstanceState, VolumeState
from .model import Progress as Progress  # re-exported: the adapters report it


class AdapterError(Exception):
    """Base of adapter errors. `retryable` tells the reconciler whether backing off helps."""

    retryable: bool = True


class PermanentError(AdapterError):
    """Retrying will not help (an image that does not exist, a bad image reference)."""

    retryable = False


class IntegrityError(PermanentError):
    """Data did not verify (checksum or size mismatch). Nothing was deleted."""


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    state: InstanceState
    exit_code: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamInfo:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ManagedResource:
    """Something labelled as ours in the runtime: used to find orphans."""

    kind: str  # "container" | "volume"
    name: str
    workspace_id: str


@dataclass(frozen=True, slots=True)
class ArchiveInfo:
    key: str
    size: int
    sha256: str
    created_at: datetime


# An adapter reports progress as the model's Progress (phase e.g. "reading", "uploading",
# "verifying", "downloading", "extracting"); the reconciler records it on the row as is.
ProgressCallback = Callable[[Progress], Awaitable[None] | None]


class Adapter:
    """The lifetime every adapter shares (see the module's guarantees); `open()` and
    `close()` do nothing unless the adapter holds something of its own."""

    async def open(self) -> None:
        """Acquire what the adapter needs before its first call. Idempotent."""

    async def close(self) -> None:
        """Release what `open()` (or a call since) acquired. Idempotent."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


class InstanceController(Adapter, ABC):
    """Runs a workspace's IDE. RUNNING has a container; WARM and COLD have none."""

    @abstractmethod
    async def start(self, workspace_id: str, image_ref: str, volume_name: str) -> None:
        """Ensure a container for the workspace runs with `volume_name` at its home, and
        return once it answers its health check. Raise PermanentError when the image is
        not available; AdapterError (with the container's last log lines) on timeout."""

    @abstractmethod
    async def stop(self, workspace_id: str) -> None:
        """Ensure the workspace has no container. The volume is untouched."""

    @abstractmethod
    async def delete(self, workspace_id: str) -> None:
        """Ensure nothing of the workspace's compute is left (container and anything
        per-workspace the runtime made). The volume is untouched."""

    @abstractmethod
    async def get_status(self, workspace_id: str) -> InstanceStatus:
        """Observe the container; never changes anything."""

    @abstractmethod
    async def resolve_upstream(self, workspace_id: str) -> UpstreamInfo:
        """Where the gateway reaches the workspace's HTTP port."""

    @abstractmethod
    async def list_managed(self) -> list[ManagedResource]:
        """Every container labelled as ours, for orphan detection."""


class StorageProvider(Adapter, ABC):
    """Owns the home of a workspace: a volume (WARM/RUNNING) or an archive (COLD)."""

    @abstractmethod
    async def provision(self, workspace_id: str, size_limit: int | None = None) -> str:
        """Ensure an empty home volume exists; return its key (volume name). `size_limit`
        (bytes): the home's size when it is made now; None: the provider's default."""

    @abstractmethod
    async def get_volume_status(self, workspace_id: str, home_store_key: str) -> VolumeState:
        """Observe the volume; never changes anything. PRESENT only for a volume of that
        name whose labels say it is ours and the workspace's own: another workspace's
        volume, or one CodeHub does not manage, is MISSING to this workspace."""

    @abstractmethod
    async def archive(
        self,
        workspace_id: str,
        home_store_key: str,
        progress: ProgressCallback | None = None,
    ) -> ArchiveInfo:
        """Stream the volume into object storage and verify what was stored.
        Deletes NOTHING: the caller commits the archive, then calls `delete_volume`."""

    @abstractmethod
    async def restore(
        self,
        workspace_id: str,
        archive_key: str,
        expected_sha256: str,
        progress: ProgressCallback | None = None,
        size_limit: int | None = None,
    ) -> str:
        """Stream the archive into a NEW volume, verifying its checksum as it flows;
        return the new volume's key. On any failure the new volume is removed and the
        archive is left as it was. `size_limit` (bytes) as for `provision`; an archive
        whose files add up to more fails with a PermanentError."""

    @abstractmethod
    async def delete_volume(self, workspace_id: str, home_store_key: str) -> None:
        """Delete the workspace's volume (and any helper still using it); a volume already
        gone is fine. PermanentError, touching nothing, for a volume that exists and is
        not labelled as CodeHub's and this workspace's."""

    @abstractmethod
    async def delete_archive(self, workspace_id: str, archive_key: str) -> None:
        """Delete the workspace's archive and its meta; one already gone is fine.
        PermanentError, touching nothing, for a key outside the workspace's own prefix
        (`{workspace_id}/`)."""

    @abstractmethod
    async def list_managed(self, workspace_id: str | None = None) -> list[ManagedResource]:
        """Every volume labelled as ours, for orphan detection; with `workspace_id`, only
        that workspace's, found by its label (not by listing every volume)."""


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    key: str
    size: int
    sha256: str
    created_at: datetime
    format: str  # "tar+gzip"


class ObjectStore(Adapter, ABC):
    """A bucket of archives. Keys are `{workspace_id}/home.tar.gz` (+ `.meta`)."""

    @abstractmethod
    async def put_stream(
        self, key: str, chunks: AsyncIterator[bytes], *, fmt: str = "tar+gzip"
    ) -> ObjectMeta:
        """Store the stream under `key` (multipart / atomic rename), hashing it on the fly;
        write the `.meta` sidecar last. A crash leaves no object that looks complete."""

    @abstractmethod
    async def head(self, key: str) -> ObjectMeta | None:
        """The stored meta of `key` checked against the stored object's size, or None."""

    @abstractmethod
    def get_stream(self, key: str) -> AsyncIterator[bytes]:
        """Stream the object's bytes."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Delete the object and its meta; missing ones are ignored."""

    @abstractmethod
    async def list_keys(self, prefix: str = "") -> list[str]:
        """Keys of stored archives (not their .meta), for orphan detection."""


class HintBus(ABC):
    """At-most-once notifications carrying workspace ids ("look at this one again").

    A lost hint costs latency, never correctness: the leader also resyncs periodically.
    """

    @abstractmethod
    async def publish(self, workspace_id: str) -> None:
        """Tell every subscriber that this workspace changed. Never raises for a bus outage."""

    @abstractmethod
    def subscribe(self) -> AsyncIterator[str | None]:
        """Yield workspace ids as they arrive; yields None after each (re)subscription,
        meaning "hints may have been missed: resync everything"."""


class Leadership(Protocol):
    """Whether this replica currently runs the reconciler (readyz and metrics show it)."""

    is_leader: bool
