"""Archives as files under a root directory: the ObjectStore of the embedded default.

Guarantees (besides those of codehub.backends.objects):
- `put_stream` writes to a temp file in the key's directory, fsyncs it, renames it over
  the key and fsyncs the directory; the sidecar is written the same way, last. The next
  `put_stream` of the key removes temp files a killed writer left behind.
- Memory is bounded whatever the object size: one chunk.
- A workspace's folder goes with its last object.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from ...constants import ARCHIVE_FORMAT, META_SUFFIX
from ...interfaces import ObjectMeta, ObjectStore, PermanentError
from ..rules import check_object_key
from .meta import DEFAULT_CHUNK_SIZE, checked, meta_body


class LocalObjectStore(ObjectStore):
    """Archives as files under a root directory (the embedded default).

    An object is `root/<key>`, its sidecar `root/<key>.meta`; both are written to a temp file
    in the same directory, fsynced, renamed into place, and the directory fsynced.
    """

    _TMP_MARK = ".tmp-"

    def __init__(self, root: str | os.PathLike[str], *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.root = Path(root)
        self._chunk_size = chunk_size

    async def open(self) -> None:
        """Create the root directory. Idempotent; closing releases nothing."""
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)

    def path_of(self, key: str) -> Path:
        """Where `key` lives on disk."""
        check_object_key(key)
        return self.root.joinpath(*PurePosixPath(key).parts)

    def _tmp_path(self, path: Path) -> Path:
        return path.with_name(f".{path.name}{self._TMP_MARK}{uuid.uuid4().hex}")

    async def put_stream(
        self, key: str, chunks: AsyncIterator[bytes], *, fmt: str = ARCHIVE_FORMAT
    ) -> ObjectMeta:
        path = self.path_of(key)
        meta_path = path.with_name(path.name + META_SUFFIX)
        await asyncio.to_thread(self._prepare, path, meta_path)
        tmp = self._tmp_path(path)
        hasher = hashlib.sha256()
        size = 0
        f = await asyncio.to_thread(open, tmp, "xb")
        try:
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    await asyncio.to_thread(_write_hashed, f, hasher, chunk)
                await asyncio.to_thread(_flush_sync, f)
            finally:
                await asyncio.to_thread(f.close)
            await asyncio.to_thread(_rename_durably, tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        meta = ObjectMeta(key=key, size=size, sha256=hasher.hexdigest(),
                          created_at=datetime.now(UTC), format=fmt)
        await asyncio.to_thread(self._write_small, meta_path, meta_body(meta))
        return meta

    def _prepare(self, path: Path, meta_path: Path) -> None:
        """Invalidate the old sidecar and drop temp files a killed writer left behind."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            meta_path.unlink()
            _fsync_dir(path.parent)
        for name in (path.name, meta_path.name):
            for stale in path.parent.glob(f".{name}{self._TMP_MARK}*"):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()

    def _write_small(self, path: Path, data: bytes) -> None:
        tmp = self._tmp_path(path)
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                _flush_sync(f)
            _rename_durably(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    async def head(self, key: str) -> ObjectMeta | None:
        path = self.path_of(key)
        meta_path = path.with_name(path.name + META_SUFFIX)
        try:
            raw = await asyncio.to_thread(meta_path.read_bytes)
            stored = (await asyncio.to_thread(path.stat)).st_size
        except FileNotFoundError:
            return None
        return checked(key, raw, stored)

    async def get_stream(self, key: str) -> AsyncIterator[bytes]:
        path = self.path_of(key)
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError as exc:
            raise PermanentError(f"object {key} not found under {self.root}") from exc
        try:
            while chunk := await asyncio.to_thread(f.read, self._chunk_size):
                yield chunk
        finally:
            f.close()

    async def delete(self, key: str) -> None:
        path = self.path_of(key)
        meta_path = path.with_name(path.name + META_SUFFIX)

        def remove() -> None:
            # The sidecar goes first: an object without one no longer looks complete.
            for p in (meta_path, path):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            with contextlib.suppress(FileNotFoundError):
                _fsync_dir(path.parent)
            if path.parent != self.root:  # a workspace's folder goes with its last object
                with contextlib.suppress(OSError):  # not empty, or already gone
                    path.parent.rmdir()

        await asyncio.to_thread(remove)

    async def list_keys(self, prefix: str = "") -> list[str]:
        def walk() -> list[str]:
            keys = []
            for dirpath, _dirs, files in os.walk(self.root):
                for name in files:
                    if name.endswith(META_SUFFIX) or (name.startswith(".")
                                                      and self._TMP_MARK in name):
                        continue
                    rel = Path(dirpath, name).relative_to(self.root).as_posix()
                    if rel.startswith(prefix):
                        keys.append(rel)
            return sorted(keys)

        return await asyncio.to_thread(walk)


def _write_hashed(f: Any, hasher: Any, chunk: bytes) -> None:
    f.write(chunk)
    hasher.update(chunk)


def _flush_sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename_durably(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_dir(path.parent)
