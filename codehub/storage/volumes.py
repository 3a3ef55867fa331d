"""Workspace homes as Docker volumes, archived to and restored from an ObjectStore.

Guarantees:
- Every volume and helper container made here carries `codehub.managed-by=codehub` and
  `codehub.workspace-id=<id>`; a volume without our label is never deleted (PermanentError).
- Nothing runs in the workspace's image. Volumes are read (and, without a restore network,
  written) through Docker's archive API on a helper container that is created and never
  started (image `helper_image`, network disabled, volume mounted with NoCopy so Docker
  never copies image files into a volume). With a restore network, restore instead runs
  GNU tar from `helper_image` in a helper on that network only (as the home's owner, no
  capability at all, no new privileges, read-only root file system), which reads the
  tar from this process over a one-time connection (codehub.storage.feed: only that
  helper's address, only with its 256-bit token, only once): dockerd is not in the data
  path, which makes restore about 1.5x faster. Helpers are named after their volume, so a
  re-run or `purge` removes what a killed process left behind.
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
  (the end-of-archive blocks among them) are held back until the checksum is known: it
  never receives a complete tar that did not verify (a failed feed is reset, not closed).
  On a mismatch (IntegrityError) or any other failure the new volume is
  removed; the archive is never touched. A re-run after a crash removes the half-made
  volume of that name first.
- `purge()` removes what it is given and ignores what is already gone.
- Memory is bounded whatever the volume size: one chunk read ahead and one being
  compressed (archive); one compressed chunk, at most RESTORE_AHEAD + 1 chunks of
  inflated output and 64 KiB held back (restore); plus what the ObjectStore buffers (S3:
  two parts).

Archive format ("tar+gzip"): a single gzip member (plain `gzip -d` reads it) holding a tar
whose one top-level entry `coder/` is the volume root itself (so its owner and mode
survive a round trip), with the home's files below it. Compression and inflation run in a
worker thread: isal (igzip, same format, several times faster than zlib) for levels 0-3
when importable, zlib otherwise (and for levels 4-9).

Failpoints (codehub.failpoints; each kills the process with SIGKILL when armed):
- `archive.after_stream_start`: the first chunk of the volume's tar stream was read.
- `archive.after_upload`: the object and its .meta are stored, nothing verified yet.
- `archive.after_verify`: verified, before returning.
- `restore.after_download_start`: the first chunk was sent to the extractor (volume half
  made).
- `restore.after_extract`: the extractor finished, helper not yet removed.
- `restore.before_return`: everything done but returning the new volume's name.
- `purge.before_volume_delete`: helpers removed, the volume about to be deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import inspect
import json
import logging
import re
import tarfile
import time
import zlib
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiodocker
import aiohttp
from aiodocker.volumes import DockerVolume

from ..constants import (
    ARCHIVE_FORMAT,
    LABEL_MANAGED_BY,
    LABEL_MANAGED_BY_VALUE,
    LABEL_ROLE,
    LABEL_WORKSPACE_ID,
    archive_key,
)
from ..failpoints import failpoint
from ..interfaces import (
    AdapterError,
    ArchiveInfo,
    IntegrityError,
    ManagedResource,
    ObjectStore,
    PermanentError,
    Progress,
    ProgressCallback,
    StorageProvider,
)
from ..model import VolumeState
from ..runtime.engine import (
    TRANSPORT_ERRORS,
    check_workspace_id,
    docker_failure,
    ensure_image,
    log_tail,
)
from ..runtime.network import BridgeNetwork
from .disks import HomeDisks
from .feed import FeedConnection, FeedListener, ListenError
from .tarfilter import TarFilter

log = logging.getLogger(__name__)
_RESTORE_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "codehub_restore_size_limit", default=None)

isal_zlib: Any
try:
    from isal import isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    isal_zlib = None

ROLE_HOME = "home"
ROLE_HELPER = "storage-helper"
LABEL_RESTORED_FROM = "codehub.restored-from-sha256"
LABEL_HOME_DISK = "codehub.home-disk"  # a size-limited home (codehub.storage.disks)

MOUNT = "/home/coder"  # where helpers mount the volume; its basename is the archive's top
_MOUNT_PARENT = "/home"
_TOP = "coder"
HOLD_BACK = 64 * 1024
RESTORE_AHEAD = 8  # inflated pieces (each at most chunk_size) queued ahead of Docker
PROGRESS_INTERVAL = 0.5  # seconds
_END_OF_TAR = bytes(1024)  # two zero blocks
_STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)
CONNECT_TIMEOUT = 60.0  # seconds a started tar helper gets to connect back
EXIT_TIMEOUT = 600.0  # seconds tar gets to finish once it has the whole stream
FEED_GRACE = 5.0  # seconds the feed gets to end by itself once tar has exited
# The tar helper's program (bash, for its /dev/tcp): connect, authenticate, extract. It
# runs as the home's owner without any capability, so it can neither chown nor make a
# device node, whatever the stream says (codehub.storage.tarfilter has already taken
# those out); the top entry `coder/` is the mount point itself, so the volume root's mode
# comes back too. Anything outside it would land on the read-only root file system of a
# throwaway container.
_TAR_SCRIPT = (
    'exec 3<>"/dev/tcp/$CODEHUB_FEED_HOST/$CODEHUB_FEED_PORT" || exit 111\n'
    "printf '%s\\n' \"$CODEHUB_FEED_TOKEN\" >&3 || exit 111\n"
    f"exec tar --extract --file=- --directory={_MOUNT_PARENT} --no-same-owner "
    "--same-permissions --xattrs --xattrs-include='user.*' <&3\n")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@contextlib.contextmanager
def _docker_errors(what: str) -> Iterator[None]:
    """Engine and transport failures are worth retrying; say what we were doing."""
    try:
        yield
    except TRANSPORT_ERRORS as exc:
        raise docker_failure(what, exc) from exc


class _Reporter:
    """Passes progress on at most once per PROGRESS_INTERVAL seconds; the first and the last
    value of every phase always get through."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback
        self._phase: str | None = None
        self._last = 0.0
        self._held: Progress | None = None

    async def __call__(self, phase: str, done: int, total: int | None) -> None:
        if self._callback is None:
            return
        now = time.monotonic()
        progress = Progress(phase, done, total)
        if phase != self._phase:
            await self.flush()
            self._phase = phase
        elif now - self._last < PROGRESS_INTERVAL:
            self._held = progress
            return
        self._held = None
        self._last = now
        await self._emit(progress)

    async def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            await self._emit(held)

    async def _emit(self, progress: Progress) -> None:
        assert self._callback is not None
        result = self._callback(progress)
        if inspect.isawaitable(result):
            await result


def _compressor(level: int) -> Any:
    """A gzip-framing (wbits 31) compressobj: isal for levels 0-3, zlib otherwise."""
    if isal_zlib is not None and 0 <= level <= 3:
        return isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)
    return zlib.compressobj(level, zlib.DEFLATED, 31)


@dataclass(slots=True)
class _Tally:
    """Size and sha256 of the compressed bytes produced. Only ever used by one thread at
    a time: each block is compressed after the previous one finished."""

    sha256: Any = field(default_factory=hashlib.sha256)
    size: int = 0

    def compress(self, comp: Any, block: bytes) -> bytes:
        out: bytes = comp.compress(block)
        self.sha256.update(out)
        self.size += len(out)
        return out

    def flush(self, comp: Any) -> bytes:
        out: bytes = comp.flush()
        self.sha256.update(out)
        self.size += len(out)
        return out


_INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error,) + (
    (isal_zlib.error,) if isal_zlib is not None else ())


class _Inflater:
    """Hashes the compressed stream and inflates it with bounded output per call. Only ever
    used by one thread at a time (each call is awaited before the next is made)."""

    def __init__(self, limit: int, what: str) -> None:
        self.sha256 = hashlib.sha256()
        self._what = what
        self._d = (isal_zlib or zlib).decompressobj(31)
        self._limit = limit

    @property
    def pending(self) -> bool:
        """Input is left that did not fit under the output limit: call `more()`."""
        return bool(self._d.unconsumed_tail)

    def first(self, chunk: bytes) -> bytes:
        self.sha256.update(chunk)
        return self._inflate(chunk)

    def more(self) -> bytes:
        return self._inflate(self._d.unconsumed_tail)

    def _inflate(self, data: bytes) -> bytes:
        try:
            out: bytes = self._d.decompress(data, self._limit)
        except _INFLATE_ERRORS as exc:
            raise IntegrityError(f"{self._what} is not valid gzip: {exc}") from exc
        return out

    def finish(self) -> bytes:
        """The last output; IntegrityError unless exactly one complete gzip member came."""
        try:
            out: bytes = self._d.flush()
        except _INFLATE_ERRORS as exc:
            raise IntegrityError(f"{self._what} is not valid gzip: {exc}") from exc
        if not self._d.eof:
            raise IntegrityError(f"{self._what} ends before its gzip trailer")
        if self._d.unused_data:
            raise IntegrityError(f"{self._what} has data after its gzip member")
        return out


@dataclass(slots=True)
class _Feed:
    """What the restore body generator learned; read after Docker answered."""

    received: int = 0
    verified: bool = False
    error: BaseException | None = None


async def _read_block(content: aiohttp.StreamReader, size: int) -> bytes:
    """At least `size` bytes (fewer only at the end of the stream), gathered from whatever
    the connection has buffered: `readany()` hands over buffered pieces without copying."""
    pieces: list[bytes] = []
    got = 0
    while got < size:
        piece = await content.readany()
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


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
        self._helper_image = helper_image
        self._level = compression_level
        self._prefix = volume_prefix
        self._chunk_size = chunk_size
        self._helper_image_ok = False
        self._restore_network = restore_network
        self._owner = home_owner
        self._size_limit = home_size_limit or None
        self._disks = disks

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
        info = await self._inspect_volume(name)
        if info is None:
            info = await self._create_volume(name, workspace_id, {},
                                             size_limit or self._size_limit)
        self._require_ours(info, workspace_id)
        return name

    async def ensure_home(self, home_store_key: str) -> None:
        """Before anything mounts the volume: a size-limited home's file system is mounted
        (PermanentError when its image is gone: never an empty home)."""
        info = await self._inspect_volume(home_store_key)
        if info is not None and (info.get("Labels") or {}).get(LABEL_HOME_DISK):
            if self._disks is None:
                raise PermanentError(f"volume {home_store_key} is a size-limited home but "
                                     "this storage has no HomeDisks to mount it")
            await self._disks.ensure_mounted(home_store_key)

    async def get_volume_status(self, workspace_id: str, home_store_key: str) -> VolumeState:
        info = await self._inspect_volume(home_store_key)
        return VolumeState.MISSING if info is None else VolumeState.PRESENT

    async def archive(
        self,
        workspace_id: str,
        home_store_key: str,
        progress: ProgressCallback | None = None,
    ) -> ArchiveInfo:
        key = self.archive_key(workspace_id)
        info = await self._inspect_volume(home_store_key)
        if info is None:
            raise PermanentError(f"volume {home_store_key} of {workspace_id} does not exist")
        self._require_ours(info, workspace_id)
        await self.ensure_home(home_store_key)
        helper = await self._create_helper(home_store_key, workspace_id, "archiver",
                                           read_only=True)
        report = _Reporter(progress)
        try:
            tally = _Tally()
            chunks = self._gzip_tar(helper, tally, report)
            try:
                stored = await self._objects.put_stream(key, chunks, fmt=ARCHIVE_FORMAT)
            finally:
                await chunks.aclose()
            failpoint("archive.after_upload")
            digest = tally.sha256.hexdigest()
            await report("verifying", tally.size, tally.size)
            head = await self._objects.head(key)
            for what, meta in (("put", stored), ("head", head)):
                if meta is None or meta.size != tally.size or meta.sha256 != digest:
                    raise IntegrityError(
                        f"archive {key} does not verify ({what}: {meta}); streamed "
                        f"{tally.size} bytes with sha256 {digest}")
            assert head is not None
            failpoint("archive.after_verify")
            return ArchiveInfo(key=key, size=head.size, sha256=head.sha256,
                               created_at=head.created_at)
        finally:
            await asyncio.shield(self._remove_container_quietly(helper))

    async def _gzip_tar(self, helper: str, tally: _Tally,
                        report: _Reporter) -> AsyncGenerator[bytes, None]:
        """The volume as a gzipped tar. Reading block N+1 from Docker and handing block N-1
        to the consumer overlap with compressing block N in a worker thread.

        Raises (so the upload is aborted) unless the tar ends with its end-of-archive marker:
        Docker still ends the HTTP response normally when its tar writer fails midway.
        """
        loop = asyncio.get_running_loop()
        comp = _compressor(self._level)
        read = 0
        tail = b""
        pending: asyncio.Future[bytes] | None = None
        with _docker_errors(f"reading volume through {helper}"):
            async with self._docker._query(
                f"containers/{helper}/archive", params={"path": MOUNT}, timeout=_STREAM_TIMEOUT,
                # Without this Docker gzips the tar itself (one Go thread, ~30 MB/s) only
                # for aiohttp to inflate it again.
                headers={"Accept-Encoding": "identity"},
            ) as resp:
                # Closed however we leave: while Docker still writes the stream it holds the
                # helper's lock, and removing the helper would wait forever.
                with contextlib.closing(resp):
                    while True:
                        block = await _read_block(resp.content, self._chunk_size)
                        out = b"" if pending is None else await pending
                        pending = None
                        if block:
                            if read == 0:
                                failpoint("archive.after_stream_start")
                            read += len(block)
                            tail = (tail + block[-len(_END_OF_TAR):])[-len(_END_OF_TAR):]
                            pending = loop.run_in_executor(None, tally.compress, comp, block)
                        if out:
                            yield out
                        if not block:
                            break
                        await report("reading", read, None)
        if tail != _END_OF_TAR:
            raise AdapterError(f"the tar stream of {helper} ended without its end-of-archive "
                               f"marker after {read} bytes")
        last = await loop.run_in_executor(None, tally.flush, comp)
        if last:
            yield last

    async def restore(
        self,
        workspace_id: str,
        archive_key: str,
        expected_sha256: str,
        progress: ProgressCallback | None = None,
        size_limit: int | None = None,
    ) -> str:
        check_workspace_id(workspace_id)
        # The limit of this restore travels with its task (and the tasks it makes), so
        # concurrent restores never see each other's.
        _RESTORE_LIMIT.set(size_limit or self._size_limit)
        expected = expected_sha256.lower()
        if not _SHA256.match(expected):
            raise PermanentError(f"invalid sha256 {expected_sha256!r}")
        meta = await self._objects.head(archive_key)
        if meta is None:
            raise PermanentError(f"archive {archive_key} of {workspace_id} does not exist")
        if meta.format != ARCHIVE_FORMAT:
            raise PermanentError(f"archive {archive_key} has unknown format {meta.format!r}")
        if meta.sha256 != expected:
            raise IntegrityError(f"archive {archive_key}: stored meta says sha256 "
                                 f"{meta.sha256}, expected {expected}")
        volume = self.restored_volume_name(workspace_id, expected)
        report = _Reporter(progress)
        await self._discard_volume(volume, workspace_id)
        try:
            await self._create_volume(volume, workspace_id, {LABEL_RESTORED_FROM: expected},
                                      _RESTORE_LIMIT.get())
            if self._restore_network is None:
                helper = await self._create_helper(volume, workspace_id, "restorer",
                                                   read_only=False)
                await self._extract(helper, archive_key, meta.size, expected, report)
            else:
                helper = await self._extract_with_tar(
                    self._restore_network, volume, workspace_id, archive_key, meta.size,
                    expected, report)
            failpoint("restore.after_extract")
            await self._remove_container(helper)
            failpoint("restore.before_return")
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._discard_volume(volume, workspace_id))
            raise
        return volume

    async def _extract(self, helper: str, key: str, size: int, expected: str,
                       report: _Reporter) -> None:
        """Stream the archive into Docker's put-archive, hashing as it flows."""
        feed = _Feed()
        try:
            with _docker_errors(f"extracting {key} through {helper}"):
                async with self._docker._query(
                    f"containers/{helper}/archive", "PUT", params={"path": _MOUNT_PARENT},
                    data=self._verified_body(key, size, expected, feed, report),
                    headers={"Content-Type": "application/x-tar"},
                    timeout=_STREAM_TIMEOUT, chunked=True,
                ) as resp:
                    with contextlib.closing(resp):
                        await resp.read()
        except AdapterError:
            # The body's own failure (a checksum mismatch, a store error) is the real cause.
            if isinstance(feed.error, AdapterError):
                raise feed.error from None
            raise
        if feed.error is not None:
            raise feed.error
        if not feed.verified:
            raise AdapterError(f"Docker finished extracting {key} before it was fully streamed")

    async def _extract_with_tar(self, network: BridgeNetwork, volume: str, workspace_id: str,
                                key: str, size: int, expected: str, report: _Reporter) -> str:
        """Run GNU tar in a helper on `network` and stream it the archive's verified tar over
        a one-time authenticated connection to this process; returns the helper's name once
        tar exited 0 after reading everything."""
        host = await network.own_address()
        name = self._helper_name(volume, "restorer")

        async def helper_address() -> str:
            info = await self._docker.containers.get(name)
            attached = (info["NetworkSettings"].get("Networks") or {}).get(network.name) or {}
            return str(attached.get("IPAddress") or "")

        try:
            async with FeedListener(host, helper_address) as listener:
                await self._run_tar_helper(listener, network, volume, name, workspace_id,
                                           key, size, expected, report)
        except ListenError as exc:
            raise PermanentError(
                f"{exc}: this process must run on the Docker host or in a container on it "
                f"(docker.gateway_container); with a remote engine set archive.restore_with "
                f"= put-archive") from exc
        return name

    async def _run_tar_helper(self, listener: FeedListener, network: BridgeNetwork,
                              volume: str, name: str, workspace_id: str, key: str, size: int,
                              expected: str, report: _Reporter) -> None:
        """Create and start the helper `name`, feed it once it connected, and check tar's
        exit."""
        await self._own_volume_root(volume, workspace_id)
        await self._create_helper(volume, workspace_id, "restorer", read_only=False,
                                  run=_tar_helper(network.name, listener, self._owner))
        with _docker_errors(f"starting {name}"):
            try:
                await self._docker.containers.container(name).start()
            except aiodocker.DockerError as exc:
                if exc.status in (400, 500) and "exec" in exc.message:
                    raise PermanentError(
                        f"helper image {self._helper_image!r} cannot run bash for a "
                        f"restore ({exc.message}); give archive.helper_image an image "
                        f"with bash and GNU tar, or set archive.restore_with = "
                        f"put-archive") from exc
                raise
        exited = asyncio.ensure_future(
            self._docker.containers.container(name).wait(timeout=None))
        try:
            with _docker_errors(f"waiting for {name} to connect"):
                try:
                    conn = await listener.accept(exited, CONNECT_TIMEOUT)
                except AdapterError as exc:
                    raise AdapterError(
                        f"{name}: {exc} (it connects to {listener.host}:{listener.port} from "
                        f"network {network.name}: a firewall on this host may drop it; "
                        f"archive.restore_with = put-archive needs no connection)"
                        f"{await log_tail(self._docker, name)}") from exc
            # tar dying leaves the stream unread but not always reset (its network
            # namespace goes with it): watch the helper while feeding it.
            feeding = asyncio.create_task(
                self._feed(conn, name, key, size, expected, report))
            try:
                await asyncio.wait({feeding, exited}, return_when=asyncio.FIRST_COMPLETED)
                if not feeding.done():  # tar ended first; our last bytes may be in flight
                    await asyncio.wait({feeding}, timeout=FEED_GRACE)
            finally:
                if not feeding.done():
                    feeding.cancel()
                await asyncio.wait([feeding])
            if not feeding.cancelled():
                feeding.result()  # raises the feed's failure
            else:
                with _docker_errors(f"waiting for tar in {name}"):
                    status = exited.result()
                raise AdapterError(
                    f"tar in {name} exited with {status.get('StatusCode')} before it read "
                    f"all of {key}{await log_tail(self._docker, name)}")
            with _docker_errors(f"waiting for tar in {name}"):
                async with asyncio.timeout(EXIT_TIMEOUT):  # (3.11's wait_for can lose a cancel)
                    status = await asyncio.shield(exited)
        finally:
            if not exited.done():
                exited.cancel()
            await asyncio.wait([exited])
            if not exited.cancelled():
                exited.exception()  # retrieved: raised above or superseded
        code = status.get("StatusCode")
        if code != 0:
            if code in (126, 127):
                raise PermanentError(
                    f"helper image {self._helper_image!r} has no usable tar (exit {code}); "
                    f"set archive.restore_with = put-archive"
                    f"{await log_tail(self._docker, name)}")
            raise AdapterError(f"tar in {name} exited with {code} extracting {key}"
                               f"{await log_tail(self._docker, name)}")

    async def _own_volume_root(self, volume: str, workspace_id: str) -> None:
        """Give the new volume's root to the home's owner before the unprivileged tar runs:
        Docker extracts a one-entry tar (`coder/`, that owner, 0755) through a created,
        never started helper (the tar helper's read-only root refuses put-archive)."""
        entry = tarfile.TarInfo(_TOP)
        entry.type, entry.mode = tarfile.DIRTYPE, 0o755
        entry.uid, entry.gid = self._owner
        data = entry.tobuf(format=tarfile.USTAR_FORMAT) + bytes(1024)
        helper = await self._create_helper(volume, workspace_id, "owner", read_only=False)
        try:
            with _docker_errors(f"preparing the root of {volume}"):
                await self._docker.containers.container(  # type: ignore[no-untyped-call]
                    helper).put_archive(_MOUNT_PARENT, data)
        finally:
            await self._remove_container(helper)

    async def _feed(self, conn: FeedConnection, helper: str, key: str, size: int,
                    expected: str, report: _Reporter) -> None:
        """Send the verified tar; on any failure reset the connection (tar sees an error,
        never an end of stream)."""
        feed = _Feed()
        body = self._verified_body(key, size, expected, feed, report)
        try:
            async for piece in body:
                await conn.send(piece)
            if not feed.verified:
                raise AdapterError(f"the stream of {key} ended before it verified")
            await conn.finish()
        except OSError as exc:
            conn.abort()
            raise AdapterError(f"tar in {helper} stopped reading {key}: {exc}"
                               f"{await log_tail(self._docker, helper)}") from exc
        except BaseException:
            conn.abort()
            raise
        finally:
            await body.aclose()

    async def _verified_body(self, key: str, size: int, expected: str, feed: _Feed,
                             report: _Reporter) -> AsyncGenerator[bytes | memoryview, None]:
        """The archive's tar for Docker, inflated here (letting Docker inflate through its
        own unpigz pipe costs about a quarter of restore throughput) by a producer task
        that runs up to RESTORE_AHEAD pieces ahead: while Docker writes files, the next
        pieces are read, hashed and inflated in a worker thread (in lockstep, each side
        mostly waited for the other).

        Invariant: the final HOLD_BACK bytes of the tar (its end-of-archive blocks among them)
        are yielded only after the whole object was read and its size, sha256 and gzip
        trailer matched, so a mismatch always ends in an aborted, incomplete request.
        """
        queue: asyncio.Queue[bytes | memoryview | None] = asyncio.Queue(RESTORE_AHEAD)
        producer = asyncio.create_task(
            self._inflate_ahead(key, size, expected, feed, report, queue))
        first = True
        try:
            while feed.error is None and (piece := await queue.get()) is not None:
                yield piece
                if first:
                    first = False
                    failpoint("restore.after_download_start")
            await producer  # its failure (a checksum mismatch, a store error) aborts Docker's
        finally:
            if not producer.done():
                producer.cancel()
            await asyncio.wait([producer])
            if not producer.cancelled():
                producer.exception()  # retrieved: raised above or superseded by our own

    async def _inflate_ahead(self, key: str, size: int, expected: str, feed: _Feed,
                             report: _Reporter,
                             queue: asyncio.Queue[bytes | memoryview | None]) -> None:
        """Read, hash and inflate the archive into `queue` (None after the last piece),
        holding back the tar's last HOLD_BACK bytes until everything verified. On failure
        it sets `feed.error` (the consumer stops) and raises."""
        inflater = _Inflater(self._chunk_size, f"archive {key} (expected sha256 {expected})")
        sanitiser = TarFilter(uid=self._owner[0], gid=self._owner[1], top=_TOP.encode(),
                              size_limit=_RESTORE_LIMIT.get())
        held = b""
        stream = self._objects.get_stream(key)
        try:
            async for chunk in stream:
                feed.received += len(chunk)
                out = await asyncio.to_thread(_filtered, sanitiser, inflater.first, chunk)
                while True:
                    if len(out) > HOLD_BACK:  # send the old tail and all but a new one
                        if held:
                            await queue.put(held)
                        await queue.put(memoryview(out)[:-HOLD_BACK])
                        held = out[-HOLD_BACK:]
                    elif len(held) + len(out) > HOLD_BACK:
                        held += out
                        await queue.put(held[:-HOLD_BACK])
                        held = held[-HOLD_BACK:]
                    else:
                        held += out
                    if not inflater.pending:
                        break
                    out = await asyncio.to_thread(_filtered, sanitiser, inflater.more)
                await report("downloading", feed.received, size)
            held += await asyncio.to_thread(_filtered, sanitiser, inflater.finish)
            digest = inflater.sha256.hexdigest()
            if feed.received != size or digest != expected:
                raise IntegrityError(
                    f"archive {key} does not verify: read {feed.received} bytes with sha256 "
                    f"{digest}, expected {size} bytes with sha256 {expected}")
            held += sanitiser.finish()  # the end-of-archive marker, only now
            if sanitiser.dropped:
                log.warning("restore of %s left out %d entries (%s)", key,
                            len(sanitiser.dropped), "; ".join(
                                f"{name}: {why}" for name, why in sanitiser.dropped[:20]))
            feed.verified = True
            if held:
                await queue.put(held)
            await report("extracting", feed.received, size)
            await queue.put(None)
        except Exception as exc:
            feed.error = exc
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)  # wakes a consumer waiting on an empty queue
            raise
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def purge(self, home_store_key: str | None, archive_key: str | None) -> None:
        if home_store_key is not None:
            await self._remove_helpers(home_store_key)
            info = await self._inspect_volume(home_store_key)
            if info is not None:
                self._require_ours(info, None)
                failpoint("purge.before_volume_delete")
                await self._delete_volume(home_store_key)
            if self._disks is not None:
                await self._disks.remove(home_store_key)
        if archive_key is not None:
            await self._objects.delete(archive_key)

    async def list_managed(self) -> list[ManagedResource]:
        with _docker_errors("listing volumes"):
            answer = await self._docker.volumes.list(  # type: ignore[no-untyped-call]
                filters={"label": [f"{LABEL_MANAGED_BY}={LABEL_MANAGED_BY_VALUE}"]})
        found = []
        for vol in answer.get("Volumes") or []:
            labels = vol.get("Labels") or {}
            if vol["Name"].startswith(self._prefix) and LABEL_WORKSPACE_ID in labels:
                found.append(ManagedResource("volume", vol["Name"], labels[LABEL_WORKSPACE_ID]))
        return sorted(found, key=lambda r: r.name)

    # --- volumes -----------------------------------------------------------------------

    async def _inspect_volume(self, name: str) -> dict[str, Any] | None:
        try:
            volume = DockerVolume(self._docker, name)  # type: ignore[no-untyped-call]
            info: dict[str, Any] = await volume.show()  # type: ignore[no-untyped-call]
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise AdapterError(f"inspecting volume {name}: Docker said {exc.status}: "
                               f"{exc.message}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdapterError(f"inspecting volume {name}: {exc!r}") from exc
        return info

    async def _create_volume(self, name: str, workspace_id: str, extra: dict[str, str],
                             size_limit: int | None) -> dict[str, Any]:
        labels = {LABEL_MANAGED_BY: LABEL_MANAGED_BY_VALUE, LABEL_WORKSPACE_ID: workspace_id,
                  LABEL_ROLE: ROLE_HOME, **extra}
        spec: dict[str, Any] = {"Name": name, "Driver": "local", "Labels": labels}
        if self._disks is not None and size_limit:
            # The file system first: a crash before the volume exists is redone by a re-run.
            await self._disks.create(name, size_limit, self._owner)
            spec["DriverOpts"] = self._disks.volume_options(name)
            labels[LABEL_HOME_DISK] = "ext4"
        with _docker_errors(f"creating volume {name}"):
            await self._docker.volumes.create(spec)  # type: ignore[no-untyped-call]
        info = await self._inspect_volume(name)
        if info is None:
            raise AdapterError(f"volume {name} vanished right after it was created")
        # Creating an existing volume returns it unchanged: make sure it is ours.
        self._require_ours(info, workspace_id)
        return info

    @staticmethod
    def _require_ours(info: dict[str, Any], workspace_id: str | None) -> None:
        labels = info.get("Labels") or {}
        if labels.get(LABEL_MANAGED_BY) != LABEL_MANAGED_BY_VALUE:
            raise PermanentError(f"volume {info.get('Name')} is not managed by CodeHub")
        if workspace_id is not None and labels.get(LABEL_WORKSPACE_ID) != workspace_id:
            raise PermanentError(f"volume {info.get('Name')} belongs to workspace "
                                 f"{labels.get(LABEL_WORKSPACE_ID)!r}, not {workspace_id!r}")

    async def _delete_volume(self, name: str) -> None:
        try:
            volume = DockerVolume(self._docker, name)  # type: ignore[no-untyped-call]
            await volume.delete()  # type: ignore[no-untyped-call]
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return
            # 409: still in use by a container that is not one of our helpers.
            raise AdapterError(f"deleting volume {name}: Docker said {exc.status}: "
                               f"{exc.message}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdapterError(f"deleting volume {name}: {exc!r}") from exc

    async def _discard_volume(self, name: str, workspace_id: str) -> None:
        """Remove a half-made volume of ours (and its helpers); refuse anything else."""
        await self._remove_helpers(name)
        info = await self._inspect_volume(name)
        if info is not None:
            self._require_ours(info, workspace_id)
            await self._delete_volume(name)
        if self._disks is not None:
            await self._disks.remove(name)

    # --- helper containers -------------------------------------------------------------

    @staticmethod
    def _helper_name(volume: str, role: str) -> str:
        return f"{volume}-{role}"

    async def _create_helper(self, volume: str, workspace_id: str, role: str, *,
                             read_only: bool, run: dict[str, Any] | None = None) -> str:
        """A container mounting `volume` at MOUNT; returns its name. Never started unless
        `run` (merged into its config, HostConfig key by key) gives it something to run."""
        name = self._helper_name(volume, role)
        await self._remove_stale_helper(name)
        config: dict[str, Any] = {
            "Image": self._helper_image,
            "Entrypoint": ["/codehub-helper-is-never-started"],
            "Labels": {LABEL_MANAGED_BY: LABEL_MANAGED_BY_VALUE,
                       LABEL_WORKSPACE_ID: workspace_id, LABEL_ROLE: ROLE_HELPER},
            "NetworkDisabled": True,
            "HostConfig": {
                "NetworkMode": "none",
                "Mounts": [{"Type": "volume", "Source": volume, "Target": MOUNT,
                            "ReadOnly": read_only, "VolumeOptions": {"NoCopy": True}}],
            },
        }
        if run is not None:
            host_config = {**config["HostConfig"], **run.get("HostConfig", {})}
            config.update(run)
            config["HostConfig"] = host_config
        await self._ensure_helper_image()
        for attempt in (1, 2):
            try:
                await self._docker.containers.create(config, name=name)
                return name
            except aiodocker.DockerError as exc:
                if exc.status == 409 and attempt == 1:  # a concurrent leftover: replace it
                    await self._remove_container(name)
                    continue
                raise AdapterError(f"creating helper {name}: Docker said {exc.status}: "
                                   f"{exc.message}") from exc
        raise AssertionError("unreachable")

    async def _remove_stale_helper(self, name: str) -> None:
        """Remove a helper a killed run left under `name`; refuse a container not ours."""
        try:
            existing = await self._docker.containers.get(name)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return
            raise AdapterError(f"inspecting container {name}: {exc.message}") from exc
        labels = existing["Config"].get("Labels") or {}
        if labels.get(LABEL_ROLE) != ROLE_HELPER or labels.get(LABEL_MANAGED_BY) != \
                LABEL_MANAGED_BY_VALUE:
            raise PermanentError(f"container {name} exists and is not a CodeHub helper")
        await self._remove_container(name)

    async def _ensure_helper_image(self) -> None:
        if self._helper_image_ok:
            return
        await ensure_image(self._docker, self._helper_image)
        self._helper_image_ok = True

    async def _remove_container(self, name: str) -> None:
        try:
            await self._docker.containers.container(name).delete(force=True)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise AdapterError(f"removing container {name}: {exc.message}") from exc

    async def _remove_container_quietly(self, name: str) -> None:
        with contextlib.suppress(Exception):
            await self._remove_container(name)

    async def _remove_helpers(self, volume: str) -> None:
        """Remove our helper containers that mount `volume` (they pin it)."""
        filters = {"label": [f"{LABEL_MANAGED_BY}={LABEL_MANAGED_BY_VALUE}",
                             f"{LABEL_ROLE}={ROLE_HELPER}"],
                   "volume": [volume]}
        with _docker_errors(f"listing helpers of {volume}"):
            helpers = await self._docker.containers.list(all=True, filters=json.dumps(filters))
        for helper in helpers:
            await self._remove_container(helper.id)


def _filtered(sanitiser: TarFilter, inflate: Callable[..., bytes], *args: bytes) -> bytes:
    """Inflate, then filter (one worker-thread call, so the loop does neither)."""
    return sanitiser.feed(inflate(*args))


def _tar_helper(network: str, listener: FeedListener, owner: tuple[int, int]
                ) -> dict[str, Any]:
    """What turns a helper into the tar extractor: the home's owner, no capability at all,
    no new privileges, a read-only root file system, a few processes, and no network but
    `network`. No memory limit: the page cache of the files it writes would be charged to
    it and throttle the writes."""
    return {
        "Entrypoint": ["/bin/bash", "-c", _TAR_SCRIPT],
        "Cmd": [],
        "User": f"{owner[0]}:{owner[1]}",
        "Env": [f"CODEHUB_FEED_HOST={listener.host}", f"CODEHUB_FEED_PORT={listener.port}",
                f"CODEHUB_FEED_TOKEN={listener.token}"],
        "NetworkDisabled": False,
        "HostConfig": {
            "NetworkMode": network,
            "ReadonlyRootfs": True,
            "CapDrop": ["ALL"],
            "CapAdd": [],
            "SecurityOpt": ["no-new-privileges"],
            "PidsLimit": 16,
        },
    }
