"""The `.meta` sidecar of a stored archive, as every ObjectStore here writes and reads it.

Guarantees:
- `meta_body()` and `parse_meta()` round-trip an ObjectMeta (JSON: size, sha256,
  created_at, format); an unreadable sidecar is an IntegrityError naming its key.
- `checked()` returns the sidecar's meta only when the stored object's size equals it, and
  raises IntegrityError otherwise (nothing is deleted).
"""

from __future__ import annotations

import json
from datetime import datetime

from ...constants import ARCHIVE_FORMAT, META_SUFFIX
from ...interfaces import IntegrityError, ObjectMeta

MiB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 1 * MiB


def meta_key(key: str) -> str:
    return key + META_SUFFIX


def meta_body(meta: ObjectMeta) -> bytes:
    return json.dumps({
        "size": meta.size,
        "sha256": meta.sha256,
        "created_at": meta.created_at.isoformat(),
        "format": meta.format,
    }, sort_keys=True).encode()


def parse_meta(key: str, raw: bytes) -> ObjectMeta:
    try:
        doc = json.loads(raw)
        return ObjectMeta(key=key, size=int(doc["size"]), sha256=str(doc["sha256"]),
                          created_at=datetime.fromisoformat(doc["created_at"]),
                          format=str(doc.get("format", ARCHIVE_FORMAT)))
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"unreadable meta of {key}: {exc}") from exc


def checked(key: str, raw: bytes, stored_size: int) -> ObjectMeta:
    """The meta in `raw`, once the stored object's size agrees with it."""
    meta = parse_meta(key, raw)
    if stored_size != meta.size:
        raise IntegrityError(
            f"{key}: stored object has {stored_size} bytes, meta says {meta.size}")
    return meta
