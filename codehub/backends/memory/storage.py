"""A StorageProvider whose volumes are dicts of files, archived to any ObjectStore.

Guarantees (those of codehub.backends.docker.volumes that a caller can see):
- Every volume made here carries `codehub.managed-by=codehub`, `codehub.workspace-id=<id>`
  and `codehub.role=home`; one without our label is never deleted or reused
  (PermanentError), nor one of another workspace.
- `provision()` is idempotent: it returns `<prefix><id>`, made empty when missing.
- `archive()` deletes nothing. It streams a real "tar+gzip" archive (one gzip member; a
  tar whose top entry `coder/` is the volume root, the files below it) into the
  ObjectStore and returns only once `head()` reports the size and sha256 of the bytes
  streamed (IntegrityError otherwise). A missing volume is a PermanentError.
- `restore()` fills a NEW volume `<prefix><id>-r<sha256[:12]>` and returns its name only
  once every byte was read and its size and sha256 matched the archive's meta; on a
  mismatch (IntegrityError), an unreadable archive (IntegrityError), files adding up to
  more than the size limit (HomeTooLarge, a PermanentError) or any other failure or
  cancellation the new volume is removed; the archive is never touched. Before any
  volume is made it refuses what codehub.backends.rules.restorable refuses. A re-run
  removes a half-made volume of that name first. The tar is filtered as the Docker
  backend filters it (codehub.storage.tarfilter); the regular files below `coder/` are
  the home.
- `delete_volume()` and `delete_archive()` remove one workspace's volume or archive, ignore
  what is already gone, and refuse (PermanentError, nothing touched) another's.
- Progress: archive reports "reading" per chunk then ("verifying", size, size); restore
  ("downloading", read, size) per chunk then ("extracting", size, size). A callback may be
  a plain function or a coroutine function.
- Every call yields to the event loop, and archive and restore once per chunk, so a
  cancellation can land in the middle.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import io
import tarfile
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ...constants import (
    ARCHIVE_FORMAT,
    LABEL_RESTORED_FROM,
    LABEL_WORKSPACE_ID,
    ROLE_HOME,
    archive_key,
)
from ...interfaces import (
    ArchiveInfo,
    IntegrityError,
    ManagedResource,
    ObjectStore,
    PermanentError,
    Progress,
    ProgressCallback,
    StorageProvider,
)
from ...model import VolumeState
from ...storage.tarfilter import TarFilter
from ..rules import (
    check_archive_of,
    check_workspace_id,
    is_managed,
    owned_by,
    ownership_labels,
    require_ours,
    restorable,
)
from .lifetime import Lifetime

TOP = "coder"
DEFAULT_CHUNK_SIZE = 64 * 1024


@dataclass(slots=True)
class MemoryVolume:
    """A home: `files` maps a path below the home (`a/b.txt`) to its bytes."""

    name: str
    labels: dict[str, str]
    files: dict[str, bytes] = field(default_factory=dict)
    size_limit: int | None = None


async def _report(callback: ProgressCallback | None, phase: str, done: int,
                  total: int | None) -> None:
    if callback is not None:
        result = callback(Progress(phase, done, total))
        if inspect.isawaitable(result):
            await result


def home_tar(files: dict[str, bytes], uid: int = 1000, gid: int = 1000) -> bytes:
    """The plain tar of a home holding `files`: the top entry `coder/` is the volume root,
    then every directory the files need, then the files, all owned by `uid:gid`."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs = {TOP} | {f"{TOP}/{'/'.join(p.split('/')[:i])}" for p in files
                        for i in range(1, p.count("/") + 1)}
        for name in sorted(dirs):
            entry = tarfile.TarInfo(name)
            entry.type, entry.mode, entry.uid, entry.gid = tarfile.DIRTYPE, 0o755, uid, gid
            tf.addfile(entry)
        for path, data in sorted(files.items()):
            entry = tarfile.TarInfo(f"{TOP}/{path}")
            entry.size, entry.mode, entry.uid, entry.gid = len(data), 0o644, uid, gid
            tf.addfile(entry, io.BytesIO(data))
    return raw.getvalue()


def gzip_tar(files: dict[str, bytes], uid: int = 1000, gid: int = 1000) -> bytes:
    """The "tar+gzip" archive of a home holding `files` (one gzip member of `home_tar`)."""
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    return comp.compress(home_tar(files, uid, gid)) + comp.flush()


def _files_of(archive: bytes, what: str, owner: tuple[int, int], limit: int | None
              ) -> dict[str, bytes]:
    """The regular files of a verified archive, through the restore filter."""
    try:
        plain = zlib.decompress(archive, 31)
    except zlib.error as exc:
        raise IntegrityError(f"{what} is not valid gzip: {exc}") from exc
    sanitiser = TarFilter(uid=owner[0], gid=owner[1], top=TOP.encode(), size_limit=limit)
    safe = sanitiser.feed(plain) + sanitiser.finish()
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(safe), mode="r:") as tf:
        for member in tf:
            if member.isreg() and member.name.startswith(TOP + "/"):
                got = tf.extractfile(member)
                assert got is not None
                files[member.name[len(TOP) + 1:]] = got.read()
    return files


class MemoryStorageProvider(Lifetime, StorageProvider):
    """Homes in `volumes` (name -> MemoryVolume), archives in `objects`."""

    def __init__(self, objects: ObjectStore, *, volume_prefix: str = "codehub-home-",
                 home_size_limit: int | None = None, home_owner: tuple[int, int] = (1000, 1000),
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.volumes: dict[str, MemoryVolume] = {}
        self.objects = objects
        self._prefix = volume_prefix
        self._size_limit = home_size_limit or None
        self._owner = home_owner
        self._chunk_size = chunk_size

    def volume_name(self, workspace_id: str) -> str:
        check_workspace_id(workspace_id)
        return f"{self._prefix}{workspace_id}"

    def restored_volume_name(self, workspace_id: str, sha256: str) -> str:
        return f"{self.volume_name(workspace_id)}-r{sha256[:12]}"

    def _require_ours(self, name: str, workspace_id: str | None) -> MemoryVolume | None:
        volume = self.volumes.get(name)
        if volume is not None:
            require_ours(volume.labels, f"volume {name}", workspace_id)
        return volume

    async def provision(self, workspace_id: str, size_limit: int | None = None) -> str:
        name = self.volume_name(workspace_id)
        await asyncio.sleep(0)
        if self._require_ours(name, workspace_id) is None:
            self.volumes[name] = MemoryVolume(name, ownership_labels(workspace_id, ROLE_HOME),
                                              size_limit=size_limit or self._size_limit)
        return name

    async def get_volume_status(self, workspace_id: str, home_store_key: str) -> VolumeState:
        check_workspace_id(workspace_id)
        await asyncio.sleep(0)
        volume = self.volumes.get(home_store_key)
        ours = volume is not None and owned_by(volume.labels, workspace_id)
        return VolumeState.PRESENT if ours else VolumeState.MISSING

    async def archive(self, workspace_id: str, home_store_key: str,
                      progress: ProgressCallback | None = None) -> ArchiveInfo:
        check_workspace_id(workspace_id)
        key = archive_key(workspace_id)
        await asyncio.sleep(0)
        volume = self._require_ours(home_store_key, workspace_id)
        if volume is None:
            raise PermanentError(f"volume {home_store_key} of {workspace_id} does not exist")
        data = gzip_tar(volume.files, *self._owner)
        digest = hashlib.sha256(data).hexdigest()
        stored = await self.objects.put_stream(key, self._chunks(data, progress),
                                               fmt=ARCHIVE_FORMAT)
        await _report(progress, "verifying", len(data), len(data))
        head = await self.objects.head(key)
        for what, meta in (("put", stored), ("head", head)):
            if meta is None or meta.size != len(data) or meta.sha256 != digest:
                raise IntegrityError(f"archive {key} does not verify ({what}: {meta}); "
                                     f"streamed {len(data)} bytes with sha256 {digest}")
        assert head is not None
        return ArchiveInfo(key=key, size=head.size, sha256=head.sha256,
                           created_at=head.created_at)

    async def _chunks(self, data: bytes, progress: ProgressCallback | None
                      ) -> AsyncIterator[bytes]:
        for start in range(0, len(data), self._chunk_size):
            await _report(progress, "reading", start, None)
            yield data[start:start + self._chunk_size]
            await asyncio.sleep(0)

    async def restore(self, workspace_id: str, archive_key: str, expected_sha256: str,
                      progress: ProgressCallback | None = None,
                      size_limit: int | None = None) -> str:
        meta = await restorable(self.objects, workspace_id, archive_key, expected_sha256)
        expected = meta.sha256
        name = self.restored_volume_name(workspace_id, expected)
        self._discard(name, workspace_id)
        limit = size_limit or self._size_limit
        labels = ownership_labels(workspace_id, ROLE_HOME, {LABEL_RESTORED_FROM: expected})
        volume = MemoryVolume(name, labels, size_limit=limit)
        self.volumes[name] = volume  # half made until it returns
        try:
            data = await self._read_verified(archive_key, meta.size, expected, progress)
            volume.files = _files_of(data, f"archive {archive_key}", self._owner, limit)
            await _report(progress, "extracting", meta.size, meta.size)
        except BaseException:
            self._discard(name, workspace_id)
            raise
        return name

    async def _read_verified(self, key: str, size: int, expected: str,
                             progress: ProgressCallback | None) -> bytes:
        digest = hashlib.sha256()
        pieces: list[bytes] = []
        read = 0
        async for chunk in self.objects.get_stream(key):
            digest.update(chunk)
            pieces.append(chunk)
            read += len(chunk)
            await _report(progress, "downloading", read, size)
            await asyncio.sleep(0)
        if read != size or digest.hexdigest() != expected:
            raise IntegrityError(
                f"archive {key} does not verify: read {read} bytes with sha256 "
                f"{digest.hexdigest()}, expected {size} bytes with sha256 {expected}")
        return b"".join(pieces)

    def _discard(self, name: str, workspace_id: str) -> None:
        if self._require_ours(name, workspace_id) is not None:
            del self.volumes[name]

    async def delete_volume(self, workspace_id: str, home_store_key: str) -> None:
        check_workspace_id(workspace_id)
        await asyncio.sleep(0)
        if self._require_ours(home_store_key, workspace_id) is not None:
            del self.volumes[home_store_key]

    async def delete_archive(self, workspace_id: str, archive_key: str) -> None:
        check_archive_of(workspace_id, archive_key)
        await self.objects.delete(archive_key)

    async def list_managed(self, workspace_id: str | None = None) -> list[ManagedResource]:
        if workspace_id is not None:
            check_workspace_id(workspace_id)
        await asyncio.sleep(0)
        return sorted((ManagedResource("volume", v.name, v.labels[LABEL_WORKSPACE_ID])
                       for v in self.volumes.values()
                       if is_managed(v.labels)
                       and v.name.startswith(self._prefix)
                       and LABEL_WORKSPACE_ID in v.labels
                       and workspace_id in (None, v.labels[LABEL_WORKSPACE_ID])),
                      key=lambda r: r.name)

    # --- what a workspace's user or an operator does (for tests) ----------------------

    def write_files(self, home_store_key: str, files: dict[str, bytes]) -> None:
        """The workspace's user writes `files` into the home."""
        self.volumes[home_store_key].files.update(files)

    def add_foreign_volume(self, name: str) -> None:
        """A volume someone else made, without our labels."""
        self.volumes[name] = MemoryVolume(name, {})
