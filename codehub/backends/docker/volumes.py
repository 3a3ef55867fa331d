"""Workspace homes as Docker volumes, archived to and restored from an ObjectStore.

Guarantees:
- Every volume and helper container made here carries `codehub.managed-by=codehub` and
  `codehub.workspace-id=<id>`; a volume without our label is never deleted (PermanentError).
- Nothing runs in the workspace's image. Volumes are read (and, without a restore network,
  written) through Docker's archive API on a helper container that is created and never
  started (codehub.backends.docker.helpers). With a restore network, restore instead runs GNU tar
  from `helper_image` in a helper on that network only (codehub.backends.docker.restore_tar);
  without, through Docker's put-archive (codehub.backends.docker.restore_put). Helpers are named
  after their volume, so a re-run or `delete_volume` removes what a killed process left behind.
- A restored home holds only what codehub.storage.tarfilter lets through, whichever
  extractor runs: members below `coder/` by clean paths (none through a symlink), no
  device nodes, no setuid/setgid bits, every file owned by `home_owner`, `user.` xattrs
  only; and its files add up to at most `home_size_limit` bytes (HomeTooLarge, a
  PermanentError, otherwise: the new volume is removed, the archive kept).
- `archive()` deletes nothing. It returns only once the store's `head()` reports an object
  whose size and sha256 equal those of the bytes streamed, and only for a tar stream that
  ended with its end-of-archive marker (Docker ends the HTTP response normally even when
  its tar writer failed midway; such an upload is aborted).
- `restore()` fills a NEW volume `<prefix><id>-r<sha256[:12]>` and returns its name only
  once every byte of the archive was streamed, the sha256 of what was read and the gzip
  trailer matched, and the extractor reported success (Docker's answer, or tar's exit code
  0). The archive is inflated here and the extractor gets the plain tar, whose last 64 KiB
  (the end-of-archive blocks among them) are held back until the checksum is known
  (codehub.storage.codec): it never receives a complete tar that did not verify.
  On a mismatch (IntegrityError) or any other failure the new volume is
  removed; the archive is never touched. A re-run after a crash removes the half-made
  volume of that name first.
- `delete_volume()` and `delete_archive()` remove one workspace's volume or archive, ignore
  what is already gone, and refuse (PermanentError, nothing touched) another's.
- Memory is bounded whatever the volume size: one chunk read ahead and one being
  compressed (archive); one compressed chunk, at most RESTORE_AHEAD + 1 chunks of
  inflated output and 64 KiB held back (restore); plus what the ObjectStore buffers (S3:
  two parts).
- Progress is reported as it happens, unthrottled; the reconciler throttles what it
  writes.

Archive format ("tar+gzip"): a single gzip member (plain `gzip -d` reads it) holding a tar
whose one top-level entry `coder/` is the volume root itself (so its owner and mode
survive a round trip), with the home's files below it (codehub.storage.codec).

Failpoints (codehub.failpoints; each kills the process with SIGKILL when armed), in this
module and the ones it drives:
- `archive.after_stream_start`: the first chunk of the volume's tar stream was read.
- `archive.after_upload`: the object and its .meta are stored, nothing verified yet.
- `archive.after_verify`: verified, before returning.
- `restore.after_download_start`: the first chunk was sent to the extractor (volume half
  made).
- `restore.after_extract`: the extractor finished, helper not yet removed.
- `restore.before_return`: everything done but returning the new volume's name.
- `delete_volume.before_delete`: helpers removed, the volume about to be deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiodocker

from ...constants import (
    ARCHIVE_FORMAT,
    LABEL_MANAGED_BY,
    LABEL_MANAGED_BY_VALUE,
    LABEL_RESTORED_FROM,
    LABEL_WORKSPACE_ID,
    ROLE_HOME,
    archive_key,
)
from ...failpoints import failpoint
from ...interfaces import (
    AdapterError,
    ArchiveInfo,
    IntegrityError,
    ManagedResource,
    ObjectMeta,
    ObjectStore,
    PermanentError,
    ProgressCallback,
    StorageProvider,
)
from ...model import VolumeState
from ...storage.codec import Expected, Tally, VerifiedTar, gzip_tar, report
from ...storage.tarfilter import TarFilter
from ..rules import (
    check_archive_of,
    check_workspace_id,
    owned_by,
    ownership_labels,
    require_ours,
    restorable,
)
from .disks import HomeDisks
from .engine import (
    delete_volume,
    docker_errors,
    inspect_volume,
)
from .helpers import TOP, Helpers
from .network import BridgeNetwork
from .restore_put import PutArchive
from .restore_tar import TarHelper
from .transport import RestoreJob, RestoreTransport

LABEL_HOME_DISK = "codehub.home-disk"  # a size-limited home (codehub.backends.docker.disks)


class DockerVolumeStorage(StorageProvider):
    """StorageProvider on local Docker volumes with archives in an ObjectStore."""

    def __init__(
        self,
        *,
        docker: aiodocker.Docker,
        objects: ObjectStore,
        helper_image: str,
        compression_level: int = 1,
        volume_prefix: str = "codehub-home-",
        chunk_size: int = 1024 * 1024,
        restore_network: BridgeNetwork | None = None,
        home_owner: tuple[int, int] = (1000, 1000),
        home_size_limit: int | None = None,
        disks: HomeDisks | None = None,
    ) -> None:
        """`helper_image` must be present locally (or pullable). `chunk_size` is the unit
        read from Docker and compressed at a time. With `restore_network`, restore runs
        GNU tar from `helper_image` in a helper on that network (see the module's doc);
        without, nothing ever runs in it."""
        if not 0 <= compression_level <= 9:
            raise ValueError("compression_level must be within 0..9")
        if not helper_image:
            raise ValueError("helper_image is required")
        self._docker = docker
        self._objects = objects
        self.helpers = Helpers(docker, helper_image)
        self._level = compression_level
        self._prefix = volume_prefix
        self._chunk_size = chunk_size
        self._owner = home_owner
        self._size_limit = home_size_limit or None
        self._disks = disks
        self._transport: RestoreTransport = (
            PutArchive(docker, self.helpers) if restore_network is None
            else TarHelper(docker, self.helpers, restore_network, home_owner))

    # --- names -------------------------------------------------------------------------

    def volume_name(self, workspace_id: str) -> str:
        """The name `provision()` gives a workspace's first home volume."""
        check_workspace_id(workspace_id)
        return f"{self._prefix}{workspace_id}"

    def restored_volume_name(self, workspace_id: str, sha256: str) -> str:
        """The name `restore()` gives the volume made from an archive with this sha256:
        deterministic, so a re-run after a crash finds what the killed run half made."""
        return f"{self.volume_name(workspace_id)}-r{sha256[:12]}"

    @staticmethod
    def archive_key(workspace_id: str) -> str:
        check_workspace_id(workspace_id)
        return archive_key(workspace_id)

    # --- StorageProvider ---------------------------------------------------------------

    async def provision(self, workspace_id: str, size_limit: int | None = None) -> str:
        name = self.volume_name(workspace_id)
        info = await inspect_volume(self._docker, name)
        if info is None:
            info = await self._create_volume(name, workspace_id, {},
                                             size_limit or self._size_limit)
        _require_ours(info, workspace_id)
        return name

    async def ensure_home(self, home_store_key: str) -> None:
        """Before anything mounts the volume: a size-limited home's file system is mounted
        (PermanentError when its image is gone: never an empty home)."""
        info = await inspect_volume(self._docker, home_store_key)
        if info is not None and (info.get("Labels") or {}).get(LABEL_HOME_DISK):
            if self._disks is None:
                raise PermanentError(f"volume {home_store_key} is a size-limited home but "
                                     "this storage has no HomeDisks to mount it")
            await self._disks.ensure_mounted(home_store_key)

    async def get_volume_status(self, workspace_id: str, home_store_key: str) -> VolumeState:
        check_workspace_id(workspace_id)
        info = await inspect_volume(self._docker, home_store_key)
        ours = info is not None and owned_by(info.get("Labels"), workspace_id)
        return VolumeState.PRESENT if ours else VolumeState.MISSING

    async def archive(self, workspace_id: str, home_store_key: str,
                      progress: ProgressCallback | None = None) -> ArchiveInfo:
        key = self.archive_key(workspace_id)
        info = await inspect_volume(self._docker, home_store_key)
        if info is None:
            raise PermanentError(f"volume {home_store_key} of {workspace_id} does not exist")
        _require_ours(info, workspace_id)
        await self.ensure_home(home_store_key)
        helper = await self.helpers.create(home_store_key, workspace_id, "archiver",
                                           read_only=True)
        try:
            tally = Tally()
            async with contextlib.aclosing(
                    self.helpers.read_tar(helper, self._chunk_size)) as blocks, \
                    contextlib.aclosing(gzip_tar(blocks, level=self._level, tally=tally,
                                                 progress=progress)) as chunks:
                stored = await self._objects.put_stream(key, chunks, fmt=ARCHIVE_FORMAT)
            failpoint("archive.after_upload")
            await report(progress, "verifying", tally.size, tally.size)
            head = await self._verify(key, tally, stored)
            failpoint("archive.after_verify")
            return ArchiveInfo(key=key, size=head.size, sha256=head.sha256,
                               created_at=head.created_at)
        finally:
            await asyncio.shield(self.helpers.remove_quietly(helper))

    async def _verify(self, key: str, tally: Tally, stored: ObjectMeta) -> ObjectMeta:
        """The store's head() of `key`, once it and the put's answer match what streamed."""
        digest = tally.sha256.hexdigest()
        head = await self._objects.head(key)
        for what, meta in (("put", stored), ("head", head)):
            if meta is None or meta.size != tally.size or meta.sha256 != digest:
                raise IntegrityError(
                    f"archive {key} does not verify ({what}: {meta}); streamed "
                    f"{tally.size} bytes with sha256 {digest}")
        assert head is not None
        return head

    async def restore(self, workspace_id: str, archive_key: str, expected_sha256: str,
                      progress: ProgressCallback | None = None,
                      size_limit: int | None = None) -> str:
        check_workspace_id(workspace_id)
        expected = await self._expected(workspace_id, archive_key, expected_sha256)
        limit = size_limit or self._size_limit
        volume = self.restored_volume_name(workspace_id, expected.sha256)
        sanitiser = TarFilter(uid=self._owner[0], gid=self._owner[1], top=TOP.encode(),
                              size_limit=limit)
        tar = VerifiedTar(self._objects.get_stream(archive_key), expected, sanitiser,
                          chunk_size=self._chunk_size, progress=progress)
        await self._discard_volume(volume, workspace_id)
        try:
            await self._create_volume(volume, workspace_id,
                                      {LABEL_RESTORED_FROM: expected.sha256}, limit)
            helper = await self._transport.extract(RestoreJob(workspace_id, volume, tar))
            failpoint("restore.after_extract")
            await self.helpers.remove(helper)
            failpoint("restore.before_return")
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._discard_volume(volume, workspace_id))
            raise
        return volume

    async def _expected(self, workspace_id: str, key: str, sha256: str) -> Expected:
        """What the archive must be, once its stored meta agrees with the caller's sha256
        (backends/rules.py: the same preconditions every StorageProvider checks)."""
        meta = await restorable(self._objects, workspace_id, key, sha256)
        return Expected(key, meta.size, sha256.lower())

    async def delete_volume(self, workspace_id: str, home_store_key: str) -> None:
        check_workspace_id(workspace_id)
        info = await inspect_volume(self._docker, home_store_key)
        if info is not None:
            _require_ours(info, workspace_id)  # before anything is touched
        await self.helpers.remove_for(home_store_key)
        if info is not None:
            failpoint("delete_volume.before_delete")
            await delete_volume(self._docker, home_store_key)
        if self._disks is not None:
            await self._disks.remove(home_store_key)

    async def delete_archive(self, workspace_id: str, archive_key: str) -> None:
        check_archive_of(workspace_id, archive_key)
        await self._objects.delete(archive_key)

    async def list_managed(self, workspace_id: str | None = None) -> list[ManagedResource]:
        wanted = [f"{LABEL_MANAGED_BY}={LABEL_MANAGED_BY_VALUE}"]
        if workspace_id is not None:
            check_workspace_id(workspace_id)
            wanted.append(f"{LABEL_WORKSPACE_ID}={workspace_id}")
        with docker_errors("listing volumes"):
            answer = await self._docker.volumes.list(  # type: ignore[no-untyped-call]
                filters={"label": wanted})
        found = []
        for vol in answer.get("Volumes") or []:
            labels = vol.get("Labels") or {}
            if vol["Name"].startswith(self._prefix) and LABEL_WORKSPACE_ID in labels:
                found.append(ManagedResource("volume", vol["Name"], labels[LABEL_WORKSPACE_ID]))
        return sorted(found, key=lambda r: r.name)

    # --- volumes -----------------------------------------------------------------------

    async def _create_volume(self, name: str, workspace_id: str, extra: dict[str, str],
                             size_limit: int | None) -> dict[str, Any]:
        labels = ownership_labels(workspace_id, ROLE_HOME, extra)
        spec: dict[str, Any] = {"Name": name, "Driver": "local", "Labels": labels}
        if self._disks is not None and size_limit:
            # The file system first: a crash before the volume exists is redone by a re-run.
            await self._disks.create(name, size_limit, self._owner)
            spec["DriverOpts"] = self._disks.volume_options(name)
            labels[LABEL_HOME_DISK] = "ext4"
        with docker_errors(f"creating volume {name}"):
            await self._docker.volumes.create(spec)  # type: ignore[no-untyped-call]
        info = await inspect_volume(self._docker, name)
        if info is None:
            raise AdapterError(f"volume {name} vanished right after it was created")
        # Creating an existing volume returns it unchanged: make sure it is ours.
        _require_ours(info, workspace_id)
        return info

    async def _discard_volume(self, name: str, workspace_id: str) -> None:
        """Remove a half-made volume of ours (and its helpers); refuse anything else."""
        await self.helpers.remove_for(name)
        info = await inspect_volume(self._docker, name)
        if info is not None:
            _require_ours(info, workspace_id)
            await delete_volume(self._docker, name)
        if self._disks is not None:
            await self._disks.remove(name)


def _require_ours(info: dict[str, Any], workspace_id: str | None) -> None:
    require_ours(info.get("Labels"), f"volume {info.get('Name')}", workspace_id)
