"""An ObjectStore in a dict: archives as bytes, their meta beside them.

Guarantees (those of codehub.backends.objects, kept in memory):
- The meta of a key exists only next to a complete object it describes: `put_stream`
  drops the old meta before it reads the stream and sets the new one after the object, so
  a failure or a cancellation at any await leaves either no meta or a true one.
- `head()` returns the meta only when the stored object's size equals it; a meta whose
  object has another size raises IntegrityError (nothing is deleted). No meta, or no
  object: None.
- `get_stream()` of a missing key raises PermanentError; it yields `chunk_size` pieces.
- `delete()` drops the meta first, then the object; a missing one is a no-op.
- A key that codehub.backends.rules refuses is refused (PermanentError) by every call
  that takes one.
- Every call yields to the event loop at least once, as a real store's would.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from ...constants import ARCHIVE_FORMAT
from ...interfaces import IntegrityError, ObjectMeta, ObjectStore, PermanentError
from ..rules import check_object_key
from .lifetime import Lifetime

DEFAULT_CHUNK_SIZE = 64 * 1024


class MemoryObjectStore(Lifetime, ObjectStore):
    """Archives in `objects` (key -> bytes) with their meta in `metas`."""

    def __init__(self, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.objects: dict[str, bytes] = {}
        self.metas: dict[str, ObjectMeta] = {}
        self._chunk_size = chunk_size

    async def put_stream(
        self, key: str, chunks: AsyncIterator[bytes], *, fmt: str = ARCHIVE_FORMAT
    ) -> ObjectMeta:
        check_object_key(key)
        self.metas.pop(key, None)
        await asyncio.sleep(0)
        digest = hashlib.sha256()
        pieces: list[bytes] = []
        async for chunk in chunks:
            digest.update(chunk)
            pieces.append(bytes(chunk))
            await asyncio.sleep(0)
        data = b"".join(pieces)
        self.objects[key] = data
        await asyncio.sleep(0)  # between object and meta: a cut here leaves no meta
        meta = ObjectMeta(key=key, size=len(data), sha256=digest.hexdigest(),
                          created_at=datetime.now(UTC), format=fmt)
        self.metas[key] = meta
        return meta

    async def head(self, key: str) -> ObjectMeta | None:
        check_object_key(key)
        await asyncio.sleep(0)
        meta = self.metas.get(key)
        data = self.objects.get(key)
        if meta is None or data is None:
            return None
        if len(data) != meta.size:
            raise IntegrityError(f"{key}: stored object has {len(data)} bytes, "
                                 f"meta says {meta.size}")
        return meta

    async def get_stream(self, key: str) -> AsyncIterator[bytes]:
        check_object_key(key)
        await asyncio.sleep(0)
        data = self.objects.get(key)
        if data is None:
            raise PermanentError(f"object {key} not found in memory")
        for start in range(0, len(data), self._chunk_size):
            yield data[start:start + self._chunk_size]
            await asyncio.sleep(0)

    async def delete(self, key: str) -> None:
        check_object_key(key)
        self.metas.pop(key, None)
        await asyncio.sleep(0)
        self.objects.pop(key, None)

    async def list_keys(self, prefix: str = "") -> list[str]:
        await asyncio.sleep(0)
        return sorted(k for k in self.objects if k.startswith(prefix))
