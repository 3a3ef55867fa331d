"""Object stores for COLD archives: S3/MinIO through aiobotocore, and a local directory.

Guarantees (both stores):
- A `.meta` sidecar ({size, sha256, created_at, format}) exists only next to a complete
  object it describes: `put_stream` deletes the old sidecar before writing anything and
  writes the new one last, so a crash at any point leaves either no sidecar or a true one.
- `head()` returns the sidecar only when the stored object's size equals it; a present
  sidecar whose object has another size raises `IntegrityError` (nothing is deleted).
- A failed or crashed `put_stream` leaves no object that looks complete. S3: the multipart
  upload is aborted on failure, and the next `put_stream` of the same key aborts uploads a
  killed process left behind. Local: data goes to a temp file that is fsynced, then
  renamed over the key; the next `put_stream` of the key removes stale temp files.
- Memory is bounded whatever the object size: S3 holds at most the part being filled plus
  the one being uploaded (2 x `part_size`); local holds one chunk.
- `delete()` of what is missing is a no-op.

S3 parts carry their own SHA-256 (`ChecksumSHA256`), so S3/MinIO reject a part damaged
in transit; the sidecar's sha256 is that of the whole object as streamed.

Lifecycle of `S3ObjectStore` (it owns an aiobotocore client): either

    async with S3ObjectStore(...) as objects: ...

or `await objects.start()` ... `await objects.close()`; in app.py a `cleanup_ctx` generator
that calls `start()`, yields, and calls `close()`. `start()` creates the bucket if missing.
`LocalObjectStore` needs no lifecycle (its `start()`/`close()` exist and do nothing).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Self

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from ...constants import ARCHIVE_FORMAT, META_SUFFIX
from ...interfaces import AdapterError, IntegrityError, ObjectMeta, ObjectStore, PermanentError

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's floor for every part but the last
DEFAULT_PART_SIZE = 16 * MiB
DEFAULT_CHUNK_SIZE = 1 * MiB

_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchUpload"})


def _meta_key(key: str) -> str:
    return key + META_SUFFIX


def _meta_body(meta: ObjectMeta) -> bytes:
    return json.dumps({
        "size": meta.size,
        "sha256": meta.sha256,
        "created_at": meta.created_at.isoformat(),
        "format": meta.format,
    }, sort_keys=True).encode()


def _parse_meta(key: str, raw: bytes) -> ObjectMeta:
    try:
        doc = json.loads(raw)
        return ObjectMeta(key=key, size=int(doc["size"]), sha256=str(doc["sha256"]),
                          created_at=datetime.fromisoformat(doc["created_at"]),
                          format=str(doc.get("format", ARCHIVE_FORMAT)))
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"unreadable meta of {key}: {exc}") from exc


def _check_key(key: str) -> None:
    path = PurePosixPath(key)
    if (not key or path.is_absolute() or ".." in path.parts or key.endswith("/")
            or "\x00" in key or key.endswith(META_SUFFIX)):
        raise PermanentError(f"invalid object key {key!r}")


class _PartBuffer:
    """Cuts a stream into parts of exactly `size` bytes, written straight into a BytesIO that
    owns its memory: the HTTP layer streams such a body as is, whereas bytes (or a BytesIO
    sharing a bytes object) get copied whole once more before they are sent."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._buf: io.BytesIO | None = None
        self._filled = 0

    def feed(self, chunk: bytes) -> Iterator[io.BytesIO]:
        """Take `chunk`; yield every part it completes, positioned at its start."""
        view = memoryview(chunk)
        while len(view):
            if self._buf is None:
                self._buf = io.BytesIO()
            n = min(len(view), self._size - self._filled)
            self._buf.write(view[:n])
            self._filled += n
            view = view[n:]
            if self._filled == self._size:
                full, self._buf, self._filled = self._buf, None, 0
                full.seek(0)
                yield full

    @property
    def pending(self) -> int:
        """Bytes taken since the last full part."""
        return self._filled

    def rest(self) -> io.BytesIO:
        """What is left after the last full part (possibly nothing)."""
        buf, self._buf, self._filled = self._buf or io.BytesIO(), None, 0
        buf.seek(0)
        return buf


def _hash_part(total: Any, part: io.BytesIO) -> str:
    """Feed `part` to the running whole-object hash; return the part's own base64 SHA-256."""
    with part.getbuffer() as view:
        total.update(view)
        return base64.b64encode(hashlib.sha256(view).digest()).decode()


def _is_not_found(exc: ClientError) -> bool:
    err = exc.response.get("Error", {})
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return str(err.get("Code", "")) in _NOT_FOUND or status == "404"


@contextlib.contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Translate botocore failures into retryable AdapterErrors."""
    try:
        yield
    except ClientError as exc:
        raise AdapterError(f"S3 {what} failed: {exc}") from exc
    except BotoCoreError as exc:
        raise AdapterError(f"S3 {what} failed: {exc}") from exc


class S3ObjectStore(ObjectStore):
    """Archives in an S3 bucket (AWS, MinIO, moto...), uploaded by multipart."""

    def __init__(
        self,
        *,
        endpoint_url: str | None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        bucket: str = "codehub-archives",
        part_size: int = DEFAULT_PART_SIZE,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
    ) -> None:
        """`endpoint_url` None means AWS itself; `part_size` >= 5 MiB (S3's minimum);
        `chunk_size` is the read size of `get_stream`."""
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be >= {MIN_PART_SIZE} bytes")
        self._endpoint_url = endpoint_url or None
        self._region = region
        self._access_key_id = access_key_id or None
        self._secret_access_key = secret_access_key or None
        self.bucket = bucket
        self._part_size = part_size
        self._chunk_size = chunk_size
        self._config = AioConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": 4, "mode": "standard"},
            # Checksums are sent explicitly (ChecksumSHA256 per part); no extra CRC pass.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
        )
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    async def start(self) -> None:
        """Open the client and create the bucket if it is missing. Idempotent."""
        if self._client is not None:
            return
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(get_session().create_client(
                "s3", endpoint_url=self._endpoint_url, region_name=self._region,
                aws_access_key_id=self._access_key_id,
                aws_secret_access_key=self._secret_access_key, config=self._config))
            self._stack = stack
            await self._ensure_bucket()
        except BaseException:
            self._client = None
            self._stack = None
            await stack.aclose()
            raise

    async def close(self) -> None:
        """Close the client. Idempotent."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def client(self) -> Any:
        """The aiobotocore S3 client (for tests and tools)."""
        if self._client is None:
            raise RuntimeError("S3ObjectStore is not started: call start() or use `async with`")
        return self._client

    async def _ensure_bucket(self) -> None:
        try:
            await self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if not _is_not_found(exc) and "NoSuchBucket" not in str(exc):
                raise AdapterError(f"S3 bucket {self.bucket} not usable: {exc}") from exc
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self._region and self._region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
        try:
            await self.client.create_bucket(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise AdapterError(f"cannot create S3 bucket {self.bucket}: {exc}") from exc

    async def put_stream(
        self, key: str, chunks: AsyncIterator[bytes], *, fmt: str = ARCHIVE_FORMAT
    ) -> ObjectMeta:
        _check_key(key)
        client = self.client
        with _s3_errors(f"delete of {_meta_key(key)}"):
            await client.delete_object(Bucket=self.bucket, Key=_meta_key(key))
        await self._abort_uploads(key)
        total = hashlib.sha256()
        size = 0
        parts_buffer = _PartBuffer(self._part_size)
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        inflight: asyncio.Task[dict[str, Any]] | None = None
        try:
            async for chunk in chunks:
                size += len(chunk)
                for part in parts_buffer.feed(chunk):
                    if upload_id is None:
                        with _s3_errors(f"multipart upload of {key}"):
                            created = await client.create_multipart_upload(
                                Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256",
                                ContentType="application/gzip")
                        upload_id = created["UploadId"]
                    # At most one part uploads while the next one fills.
                    if inflight is not None:
                        parts.append(await inflight)
                    inflight = asyncio.create_task(
                        self._upload_part(key, upload_id, len(parts) + 1, part, total))
                    del part
            if inflight is not None:
                parts.append(await inflight)
                inflight = None
            left = parts_buffer.pending
            last = parts_buffer.rest()
            if upload_id is None:
                await self._put_small(key, last, total)
            else:
                if left:
                    parts.append(await self._upload_part(key, upload_id, len(parts) + 1, last,
                                                         total))
                with _s3_errors(f"completion of {key}"):
                    await client.complete_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id,
                        MultipartUpload={"Parts": parts})
                upload_id = None
        except BaseException:
            if inflight is not None:
                inflight.cancel()
                with contextlib.suppress(BaseException):
                    await inflight
            if upload_id is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id))
            raise
        meta = ObjectMeta(key=key, size=size, sha256=total.hexdigest(),
                          created_at=datetime.now(UTC), format=fmt)
        with _s3_errors(f"meta write of {key}"):
            await client.put_object(Bucket=self.bucket, Key=_meta_key(key), Body=_meta_body(meta),
                                    ContentType="application/json")
        return meta

    async def _upload_part(self, key: str, upload_id: str, number: int, part: io.BytesIO,
                           total: Any) -> dict[str, Any]:
        digest = await asyncio.to_thread(_hash_part, total, part)
        with _s3_errors(f"upload of part {number} of {key}"):
            answer = await self.client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=part,
                ChecksumSHA256=digest)
        return {"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": digest}

    async def _put_small(self, key: str, body: io.BytesIO, total: Any) -> None:
        digest = await asyncio.to_thread(_hash_part, total, body)
        with _s3_errors(f"upload of {key}"):
            await self.client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                         ChecksumSHA256=digest, ContentType="application/gzip")

    async def _abort_uploads(self, key: str) -> None:
        """Abort multipart uploads of `key` that a killed process left open."""
        with _s3_errors(f"listing of uploads of {key}"):
            listing = await self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
        for upload in listing.get("Uploads") or []:
            if upload.get("Key") != key:
                continue
            try:
                await self.client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                         UploadId=upload["UploadId"])
            except ClientError as exc:
                if not _is_not_found(exc):
                    raise AdapterError(f"S3 abort of a stale upload of {key}: {exc}") from exc

    async def head(self, key: str) -> ObjectMeta | None:
        _check_key(key)
        client = self.client
        try:
            answer = await client.get_object(Bucket=self.bucket, Key=_meta_key(key))
            async with answer["Body"] as body:
                raw = await body.read()
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise AdapterError(f"S3 read of {_meta_key(key)} failed: {exc}") from exc
        meta = _parse_meta(key, raw)
        try:
            stored = await client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise AdapterError(f"S3 head of {key} failed: {exc}") from exc
        if int(stored["ContentLength"]) != meta.size:
            raise IntegrityError(
                f"{key}: stored object has {stored['ContentLength']} bytes, meta says {meta.size}")
        return meta

    async def get_stream(self, key: str) -> AsyncIterator[bytes]:
        _check_key(key)
        try:
            answer = await self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_not_found(exc):
                raise PermanentError(f"object {key} not found in bucket {self.bucket}") from exc
            raise AdapterError(f"S3 read of {key} failed: {exc}") from exc
        async with answer["Body"] as body:
            try:
                while chunk := await _read_up_to(body, self._chunk_size):
                    yield chunk
            except (TimeoutError, ClientError, BotoCoreError, OSError) as exc:
                raise AdapterError(f"S3 read of {key} failed: {exc}") from exc

    async def delete(self, key: str) -> None:
        _check_key(key)
        # The sidecar goes first: an object without one no longer looks complete.
        for name in (_meta_key(key), key):
            try:
                await self.client.delete_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if not _is_not_found(exc):
                    raise AdapterError(f"S3 delete of {name} failed: {exc}") from exc

    async def list_keys(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        with _s3_errors(f"listing of {prefix!r}"):
            paginator = self.client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(o["Key"] for o in page.get("Contents") or []
                            if not o["Key"].endswith(META_SUFFIX))
        return sorted(keys)


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

    async def start(self) -> None:
        """Create the root directory. Idempotent."""
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)

    async def close(self) -> None:
        """Nothing to release."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def path_of(self, key: str) -> Path:
        """Where `key` lives on disk."""
        _check_key(key)
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
        await asyncio.to_thread(self._write_small, meta_path, _meta_body(meta))
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
        meta = _parse_meta(key, raw)
        if stored != meta.size:
            raise IntegrityError(f"{key}: stored object has {stored} bytes, meta says {meta.size}")
        return meta

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


async def _read_up_to(body: Any, size: int) -> bytes:
    """Up to `size` bytes (fewer only at the end): the HTTP layer hands out ~64 KiB at a time."""
    pieces: list[bytes] = []
    got = 0
    while got < size:
        piece = await body.read(size - got)
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


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
