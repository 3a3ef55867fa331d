"""What every ObjectStore guarantees (codehub/interfaces.py), one check per guarantee.

Each `check_*` takes an ObjectKit and fails (AssertionError or pytest.fail) when the store
breaks the guarantee its name states. test_conformance_objects.py runs every check against
every implementation; test_conformance_suite.py shows that broken stores fail them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import pytest
from conformance_kits import ObjectKit
from conformance_tools import assert_lifetime, cancel_when, must_succeed, read_object

from codehub.interfaces import IntegrityError, PermanentError

KEY = "w1/home.tar.gz"
BAD_KEYS = ("", "/w1/home.tar.gz", "w1/../w2/home.tar.gz", "w1/", "w1/home.tar.gz.meta",
            "w1/a\x00b")


async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]
        await asyncio.sleep(0)


class Boom(Exception):
    pass


async def failing_after(data: bytes, at: int) -> AsyncIterator[bytes]:
    async for chunk in chunks(data[:at]):
        yield chunk
    raise Boom("the source failed mid-stream")


async def check_put_stream_round_trips_and_its_meta_describes_the_object(
        kit: ObjectKit) -> None:
    for size in (0, 1000, 300 * 1024):
        data = os.urandom(size)
        meta = await kit.store.put_stream(KEY, chunks(data))
        assert (meta.key, meta.size, meta.format) == (KEY, size, "tar+gzip")
        assert meta.sha256 == hashlib.sha256(data).hexdigest()
        assert await kit.store.head(KEY) == meta
        assert await read_object(kit.store, KEY) == data


async def check_a_second_put_stream_replaces_the_object_and_its_meta(kit: ObjectKit) -> None:
    await kit.store.put_stream(KEY, chunks(os.urandom(200 * 1024)))
    data = os.urandom(50 * 1024)
    meta = await kit.store.put_stream(KEY, chunks(data))
    assert await kit.store.head(KEY) == meta
    assert await read_object(kit.store, KEY) == data


async def check_a_failed_put_stream_leaves_nothing_that_looks_complete(kit: ObjectKit) -> None:
    data = os.urandom(300 * 1024)
    with pytest.raises(Boom):
        await kit.store.put_stream(KEY, failing_after(data, 100 * 1024))
    assert await kit.store.head(KEY) is None
    await kit.store.put_stream(KEY, chunks(data))
    with pytest.raises(Boom):  # over an object that was complete
        await kit.store.put_stream(KEY, failing_after(data, 100 * 1024))
    assert await kit.store.head(KEY) is None, "a failed overwrite left the old meta"


async def check_a_put_stream_cancelled_midway_leaves_nothing_complete_and_a_rerun_stores_it(
        kit: ObjectKit) -> None:
    data = os.urandom(300 * 1024)
    await kit.store.put_stream(KEY, chunks(os.urandom(1000)))  # an old object
    sent = asyncio.Event()
    never = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield data[:100 * 1024]
        sent.set()
        await never.wait()
        yield data[100 * 1024:]

    async def reached() -> bool:
        return sent.is_set()

    assert await cancel_when(kit.store.put_stream(KEY, stalls()), reached)
    assert await kit.store.head(KEY) is None
    meta = await must_succeed(kit.store.put_stream(KEY, chunks(data)), "put after a cancel")
    assert await kit.store.head(KEY) == meta
    assert await read_object(kit.store, KEY) == data


async def check_head_raises_integrity_error_when_the_object_size_differs_from_its_meta(
        kit: ObjectKit) -> None:
    await kit.store.put_stream(KEY, chunks(os.urandom(4096)))
    await kit.overwrite_bytes(KEY, b"short")
    for _ in range(2):  # nothing was deleted
        with pytest.raises(IntegrityError):
            await kit.store.head(KEY)


async def check_delete_is_idempotent_and_missing_keys_read_as_absent(kit: ObjectKit) -> None:
    await must_succeed(kit.store.delete(KEY), "delete of a missing key")
    assert await kit.store.head(KEY) is None
    with pytest.raises(PermanentError):
        await read_object(kit.store, KEY)
    await kit.store.put_stream(KEY, chunks(b"data"))
    for attempt in ("a first", "a second"):
        await must_succeed(kit.store.delete(KEY), f"{attempt} delete")
        assert await kit.store.head(KEY) is None
    assert await kit.store.list_keys() == []


async def check_keys_with_path_tricks_are_refused(kit: ObjectKit) -> None:
    for key in BAD_KEYS:
        with pytest.raises(PermanentError):
            await kit.store.put_stream(key, chunks(b"x"))
        with pytest.raises(PermanentError):
            await kit.store.head(key)
        with pytest.raises(PermanentError):
            await read_object(kit.store, key)
        with pytest.raises(PermanentError):
            await kit.store.delete(key)
    assert await kit.store.list_keys() == []


async def check_list_keys_lists_objects_by_prefix_and_never_their_meta(kit: ObjectKit) -> None:
    keys = ["w1/home.tar.gz", "w2/home.tar.gz"]
    for key in keys:
        await kit.store.put_stream(key, chunks(b"data of " + key.encode()))
    assert await kit.store.list_keys() == keys
    assert await kit.store.list_keys("w1/") == keys[:1]
    assert await kit.store.list_keys("w3/") == []


async def check_works_as_an_async_context_manager_and_closes(kit: ObjectKit) -> None:
    await assert_lifetime(kit.store, kit.store.list_keys, kit.released)


CHECKS = [f for name, f in list(globals().items()) if name.startswith("check_")]
