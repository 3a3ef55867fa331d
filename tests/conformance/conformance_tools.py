"""Tools the conformance checks share: cutting a call off mid-way, failing with words when a
call that must succeed raises, and an ObjectStore wrapper that injects faults (the only
double here: it wraps a real store and breaks what a check names)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from codehub.interfaces import Adapter, AdapterError, ObjectMeta, ObjectStore

T = TypeVar("T")


async def must_succeed(call: Awaitable[T], what: str) -> T:
    """Await `call`; a guarantee says it succeeds, so any error fails the check naming it."""
    try:
        return await call
    except Exception as exc:
        pytest.fail(f"{what} must succeed but raised {type(exc).__name__}: {exc}")


async def assert_lifetime(adapter: Adapter, use: Callable[[], Awaitable[Any]],
                         released: Callable[[], bool]) -> None:
    """The lifetime of codehub.interfaces.Adapter: `async with adapter` gives the adapter,
    which works inside (`use()`); leaving closes it (`released()`: it holds nothing it
    opened); a second close is fine; and a closed adapter may be opened again."""
    for attempt in ("first", "second"):
        async with adapter as entered:
            assert entered is adapter, "`async with` gave something else than the adapter"
            await must_succeed(use(), f"a call inside the {attempt} `async with`")
        assert released(), f"leaving the {attempt} `async with` did not close the adapter"
        await must_succeed(adapter.close(), "a second close")


async def cancel_when(call: Coroutine[Any, Any, Any],
                      reached: Callable[[], Awaitable[bool]]) -> bool:
    """Run `call`, cancel it as soon as `reached()` holds while it still runs, and wait for
    it to end. True when it was cancelled mid-way; False when it finished first (its error,
    if any, is raised)."""
    task = asyncio.ensure_future(call)
    while not task.done():
        if await reached():
            break
        await asyncio.sleep(0)
    if task.done():
        task.result()
        return False
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
    return True


async def read_object(store: ObjectStore, key: str) -> bytes:
    return b"".join([chunk async for chunk in store.get_stream(key)])


async def sha256_of_object(store: ObjectStore, key: str) -> str:
    return hashlib.sha256(await read_object(store, key)).hexdigest()


class InjectedFault(AdapterError):
    """The fault a FaultyObjects was told to inject."""


class FaultyObjects(ObjectStore):
    """Delegates to `inner`, but `put_stream` fails once it received `fail_put_after` bytes,
    and `get_stream` flips one byte in the middle of the object (`corrupt_reads`: its size
    unchanged) or streams `substitute` instead (another object swapped in behind the
    meta's back)."""

    def __init__(self, inner: ObjectStore, *, fail_put_after: int | None = None,
                 corrupt_reads: bool = False, substitute: bytes | None = None) -> None:
        self.inner = inner
        self._fail_after = fail_put_after
        self._corrupt = corrupt_reads
        self._substitute = substitute

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes], *,
                         fmt: str = "tar+gzip") -> ObjectMeta:
        return await self.inner.put_stream(key, self._failing(chunks), fmt=fmt)

    async def _failing(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in chunks:
            seen += len(chunk)
            if self._fail_after is not None and seen > self._fail_after:
                raise InjectedFault(f"injected: the store failed after {seen} bytes")
            yield chunk

    async def head(self, key: str) -> ObjectMeta | None:
        return await self.inner.head(key)

    async def get_stream(self, key: str) -> AsyncIterator[bytes]:
        if self._substitute is not None:
            yield self._substitute
            return
        meta = await self.inner.head(key)
        middle = -1 if meta is None or not self._corrupt else meta.size // 2
        at = 0
        async for chunk in self.inner.get_stream(key):
            if at <= middle < at + len(chunk):
                flipped = bytearray(chunk)
                flipped[middle - at] ^= 0xFF
                chunk = bytes(flipped)
            at += len(chunk)
            yield chunk

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def list_keys(self, prefix: str = "") -> list[str]:
        return await self.inner.list_keys(prefix)
