"""Object stores (codehub/backends/objects/): S3 against a real S3 API (moto server) and
the local-directory store, held to the same guarantees."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from codehub.backends.objects import MIN_PART_SIZE, LocalObjectStore, S3ObjectStore
from codehub.interfaces import IntegrityError, ObjectStore, PermanentError

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
KEY = "w1/home.tar.gz"


def s3_store(settings: dict[str, str], **kw: Any) -> S3ObjectStore:
    return S3ObjectStore(endpoint_url=settings["endpoint_url"], region=settings["region"],
                         access_key_id=settings["access_key_id"],
                         secret_access_key=settings["secret_access_key"],
                         bucket=settings["bucket"], **kw)


@pytest.fixture(params=["s3", "local"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    if request.param == "s3":
        settings = request.getfixturevalue("s3_settings")
        async with s3_store(settings, part_size=MIN_PART_SIZE) as s3:
            yield s3
    else:
        async with LocalObjectStore(tmp_path / "objects") as local:
            yield local


async def chunks(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


class Boom(Exception):
    pass


async def failing_after(data: bytes, fail_at: int) -> AsyncIterator[bytes]:
    async for c in chunks(data[:fail_at]):
        yield c
    raise Boom("source failed mid-stream")


async def read_all(store: ObjectStore, key: str) -> bytes:
    return b"".join([c async for c in store.get_stream(key)])


@pytest.mark.parametrize("size", [0, 1000, 12 * MiB + 17])
async def test_put_stream_round_trips_and_meta_describes_the_object(
        store: ObjectStore, size: int) -> None:
    data = os.urandom(size)
    meta = await store.put_stream(KEY, chunks(data))
    assert meta.size == size
    assert meta.sha256 == hashlib.sha256(data).hexdigest()
    assert meta.format == "tar+gzip"
    assert await store.head(KEY) == meta
    assert await read_all(store, KEY) == data
    assert await store.list_keys() == [KEY]
    assert await store.list_keys("w2/") == []


async def test_overwrite_replaces_object_and_meta(store: ObjectStore) -> None:
    await store.put_stream(KEY, chunks(os.urandom(7 * MiB)))
    data = os.urandom(3 * MiB)
    meta = await store.put_stream(KEY, chunks(data))
    assert await store.head(KEY) == meta
    assert await read_all(store, KEY) == data


async def test_failed_put_stream_leaves_nothing_that_looks_complete(
        store: ObjectStore, tmp_path: Path) -> None:
    """An older complete object is invalidated first; the failed one never gets a meta."""
    await store.put_stream(KEY, chunks(os.urandom(MiB)))
    data = os.urandom(13 * MiB)
    with pytest.raises(Boom):
        await store.put_stream(KEY, failing_after(data, 11 * MiB))
    assert await store.head(KEY) is None
    if isinstance(store, S3ObjectStore):
        uploads = await store.client.list_multipart_uploads(Bucket=store.bucket)
        assert not uploads.get("Uploads")
    else:
        assert isinstance(store, LocalObjectStore)
        leftovers = [p.name for p in (store.root / "w1").iterdir() if ".tmp-" in p.name]
        assert leftovers == []


async def test_put_stream_aborts_uploads_a_killed_writer_left_open(
        s3_settings: dict[str, str]) -> None:
    async with s3_store(s3_settings) as s3:
        stale = await s3.client.create_multipart_upload(Bucket=s3.bucket, Key=KEY)
        await s3.client.upload_part(Bucket=s3.bucket, Key=KEY, UploadId=stale["UploadId"],
                                    PartNumber=1, Body=b"x" * 100)
        await s3.put_stream(KEY, chunks(b"fresh"))
        uploads = await s3.client.list_multipart_uploads(Bucket=s3.bucket)
        assert not uploads.get("Uploads")
        assert await read_all(s3, KEY) == b"fresh"


async def test_local_put_stream_removes_temp_files_a_killed_writer_left(tmp_path: Path) -> None:
    async with LocalObjectStore(tmp_path) as local:
        (tmp_path / "w1").mkdir()
        stale = tmp_path / "w1" / ".home.tar.gz.tmp-deadbeef"
        stale.write_bytes(b"half")
        await local.put_stream(KEY, chunks(b"whole"))
        assert not stale.exists()
        assert await local.list_keys() == [KEY]


async def test_head_raises_integrity_error_when_object_size_differs_from_meta(
        store: ObjectStore) -> None:
    await store.put_stream(KEY, chunks(b"a" * 5000))
    if isinstance(store, S3ObjectStore):
        await store.client.put_object(Bucket=store.bucket, Key=KEY, Body=b"a" * 4999)
    else:
        assert isinstance(store, LocalObjectStore)
        store.path_of(KEY).write_bytes(b"a" * 4999)
    with pytest.raises(IntegrityError):
        await store.head(KEY)


async def test_delete_is_idempotent_and_missing_keys_read_as_absent(store: ObjectStore) -> None:
    await store.put_stream(KEY, chunks(b"data"))
    for _ in range(2):
        await store.delete(KEY)
        assert await store.head(KEY) is None
        assert await store.list_keys() == []
    with pytest.raises(PermanentError):
        await read_all(store, KEY)


async def test_keys_with_path_tricks_are_rejected(store: ObjectStore) -> None:
    for bad in ("../x", "/abs", "a/../../b", "", "w1/home.tar.gz.meta"):
        with pytest.raises(PermanentError):
            await store.head(bad)


async def test_bucket_is_created_when_missing_and_open_is_idempotent(
        s3_settings: dict[str, str]) -> None:
    s3 = s3_store(s3_settings)
    await s3.open()
    await s3.open()
    try:
        await s3.client.head_bucket(Bucket=s3_settings["bucket"])
        again = s3_store(s3_settings)
        async with again:  # an existing bucket is fine
            assert await again.list_keys() == []
    finally:
        await s3.close()
        await s3.close()
    with pytest.raises(RuntimeError):
        s3.client  # noqa: B018


async def test_multipart_parts_carry_sha256_checksums(s3_settings: dict[str, str]) -> None:
    async with s3_store(s3_settings, part_size=MIN_PART_SIZE) as s3:
        data = os.urandom(11 * MiB)
        await s3.put_stream(KEY, chunks(data))
        head = await s3.client.head_object(Bucket=s3.bucket, Key=KEY, ChecksumMode="ENABLED")
        assert head["ContentLength"] == len(data)
        assert head.get("ChecksumSHA256")


def test_part_size_below_s3_minimum_is_refused() -> None:
    with pytest.raises(ValueError):
        S3ObjectStore(endpoint_url="http://127.0.0.1:1", part_size=MiB)


async def test_local_store_removes_a_workspace_folder_with_its_last_object(
        tmp_path: Path) -> None:
    local = LocalObjectStore(tmp_path / "objects")
    await local.open()
    await local.put_stream("ws1/home.tar.gz", chunks(b"abc"))
    assert (tmp_path / "objects" / "ws1").is_dir()
    await local.delete("ws1/home.tar.gz")
    assert not (tmp_path / "objects" / "ws1").exists()
    assert (tmp_path / "objects").is_dir()  # the root stays
    await local.delete("ws1/home.tar.gz")  # and a second delete is still fine
