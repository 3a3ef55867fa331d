"""Archives in an S3 bucket (AWS, MinIO, moto...) through aiobotocore, uploaded by multipart.

Guarantees (besides those of codehub.backends.objects):
- A failed `put_stream` aborts its multipart upload, and the next `put_stream` of the same
  key aborts uploads a killed process left behind.
- Memory is bounded whatever the object size: at most the part being filled plus the one
  being uploaded (2 x `part_size`).
- Parts carry their own SHA-256 (`ChecksumSHA256`), so S3/MinIO reject a part damaged in
  transit; the sidecar's sha256 is that of the whole object as streamed.
- `open()` opens the client and creates the bucket when it is missing; `close()` closes
  the client. A call while closed raises RuntimeError.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from ...constants import ARCHIVE_FORMAT, META_SUFFIX
from ...interfaces import AdapterError, ObjectMeta, ObjectStore, PermanentError
from ..rules import check_object_key
from .meta import DEFAULT_CHUNK_SIZE, MiB, checked, meta_body, meta_key

MIN_PART_SIZE = 5 * MiB  # S3's floor for every part but the last
DEFAULT_PART_SIZE = 16 * MiB

_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchUpload"})


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
        self.part_size = part_size
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

    async def open(self) -> None:
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

    @property
    def client(self) -> Any:
        """The aiobotocore S3 client (for tests and tools)."""
        if self._client is None:
            raise RuntimeError("S3ObjectStore is not open: use `async with` (or open())")
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
        check_object_key(key)
        with _s3_errors(f"delete of {meta_key(key)}"):
            await self.client.delete_object(Bucket=self.bucket, Key=meta_key(key))
        await self._abort_uploads(key)
        upload = _Upload(self, key)
        try:
            size = await upload.send(chunks)
        except BaseException:
            await asyncio.shield(upload.abort())
            raise
        meta = ObjectMeta(key=key, size=size, sha256=upload.total.hexdigest(),
                          created_at=datetime.now(UTC), format=fmt)
        with _s3_errors(f"meta write of {key}"):
            await self.client.put_object(Bucket=self.bucket, Key=meta_key(key),
                                         Body=meta_body(meta), ContentType="application/json")
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
        check_object_key(key)
        client = self.client
        try:
            answer = await client.get_object(Bucket=self.bucket, Key=meta_key(key))
            async with answer["Body"] as body:
                raw = await body.read()
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise AdapterError(f"S3 read of {meta_key(key)} failed: {exc}") from exc
        try:
            stored = await client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise AdapterError(f"S3 head of {key} failed: {exc}") from exc
        return checked(key, raw, int(stored["ContentLength"]))

    async def get_stream(self, key: str) -> AsyncIterator[bytes]:
        check_object_key(key)
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
        check_object_key(key)
        # The sidecar goes first: an object without one no longer looks complete.
        for name in (meta_key(key), key):
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


class _Upload:
    """One `put_stream`: a single PUT when the object fits in one part, else a multipart
    upload with at most one part in flight while the next one fills."""

    def __init__(self, store: S3ObjectStore, key: str) -> None:
        self._store = store
        self._key = key
        self.total = hashlib.sha256()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._inflight: asyncio.Task[dict[str, Any]] | None = None

    async def send(self, chunks: AsyncIterator[bytes]) -> int:
        """Store every chunk; the object's size once it is complete."""
        size = 0
        buffer = _PartBuffer(self._store.part_size)
        async for chunk in chunks:
            size += len(chunk)
            for part in buffer.feed(chunk):
                await self._queue(part)
                del part
        await self._settle()
        left, last = buffer.pending, buffer.rest()
        if self._upload_id is None:
            await self._store._put_small(self._key, last, self.total)
            return size
        if left:
            self._parts.append(await self._store._upload_part(
                self._key, self._upload_id, len(self._parts) + 1, last, self.total))
        with _s3_errors(f"completion of {self._key}"):
            await self._store.client.complete_multipart_upload(
                Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts})
        self._upload_id = None
        return size

    async def _queue(self, part: io.BytesIO) -> None:
        if self._upload_id is None:
            with _s3_errors(f"multipart upload of {self._key}"):
                created = await self._store.client.create_multipart_upload(
                    Bucket=self._store.bucket, Key=self._key, ChecksumAlgorithm="SHA256",
                    ContentType="application/gzip")
            self._upload_id = created["UploadId"]
        await self._settle()
        self._inflight = asyncio.create_task(self._store._upload_part(
            self._key, self._upload_id, len(self._parts) + 1, part, self.total))

    async def _settle(self) -> None:
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            self._parts.append(await inflight)

    async def abort(self) -> None:
        """After a failure: cancel the part in flight and abort the multipart upload."""
        if self._inflight is not None:
            self._inflight.cancel()
            with contextlib.suppress(BaseException):
                await self._inflight
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                await self._store.client.abort_multipart_upload(
                    Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id)


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
