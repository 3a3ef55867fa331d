"""The checks every backend makes before it acts, worded once for all of them.

Guarantees:
- `check_workspace_id()` raises PermanentError for an id outside model.WORKSPACE_ID,
  before it becomes part of any name.
- `check_object_key()` raises PermanentError for a key no ObjectStore may hold: empty,
  absolute, with a `..` part, ending with `/` or `.meta`, or holding a NUL.
- `ownership_labels(workspace_id, role)` are the labels that make an object CodeHub's
  and a workspace's; `owned_by(labels, workspace_id)` is true only for labels that say
  CodeHub manages the object and that it belongs to that workspace; `require_ours()`
  raises PermanentError unless the labels say CodeHub manages the object (and, with a
  workspace id, that it is that workspace's), naming the object.
- `check_archive_of(workspace_id, key)` raises PermanentError unless `key` is a valid
  object key under the workspace's own prefix `{workspace_id}/` (constants.archive_key).
- `restorable()` returns the stored meta of an archive a restore may read, and raises
  before anything is made: PermanentError for a malformed sha256, a missing archive or
  an unknown format; IntegrityError when the meta names another sha256 than expected.

Every backend uses these (codehub.backends.docker, .objects, .memory): none holds a copy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath

from ..constants import (
    ARCHIVE_FORMAT,
    LABEL_MANAGED_BY,
    LABEL_MANAGED_BY_VALUE,
    LABEL_ROLE,
    LABEL_WORKSPACE_ID,
    META_SUFFIX,
)
from ..interfaces import IntegrityError, ObjectMeta, ObjectStore, PermanentError
from ..model import WORKSPACE_ID

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_workspace_id(workspace_id: str) -> None:
    if not WORKSPACE_ID.fullmatch(workspace_id):
        raise PermanentError(f"invalid workspace id {workspace_id!r}")


def check_object_key(key: str) -> None:
    path = PurePosixPath(key)
    if (not key or path.is_absolute() or ".." in path.parts or key.endswith("/")
            or "\x00" in key or key.endswith(META_SUFFIX)):
        raise PermanentError(f"invalid object key {key!r}")


def check_archive_of(workspace_id: str, key: str) -> None:
    check_workspace_id(workspace_id)
    check_object_key(key)
    if not key.startswith(f"{workspace_id}/"):
        raise PermanentError(f"object {key!r} is not an archive of workspace {workspace_id!r}")


def ownership_labels(workspace_id: str, role: str, extra: Mapping[str, str] | None = None
                     ) -> dict[str, str]:
    return {LABEL_MANAGED_BY: LABEL_MANAGED_BY_VALUE, LABEL_WORKSPACE_ID: workspace_id,
            LABEL_ROLE: role, **(extra or {})}


def is_managed(labels: Mapping[str, str] | None) -> bool:
    return (labels or {}).get(LABEL_MANAGED_BY) == LABEL_MANAGED_BY_VALUE


def owned_by(labels: Mapping[str, str] | None, workspace_id: str) -> bool:
    return is_managed(labels) and (labels or {}).get(LABEL_WORKSPACE_ID) == workspace_id


def require_ours(labels: Mapping[str, str] | None, what: str,
                 workspace_id: str | None = None) -> None:
    """PermanentError unless CodeHub manages `what` (of `workspace_id`, when given)."""
    labels = labels or {}
    if not is_managed(labels):
        raise PermanentError(f"{what} exists and is not managed by CodeHub: refusing to "
                             "touch it")
    if workspace_id is not None and labels.get(LABEL_WORKSPACE_ID) != workspace_id:
        raise PermanentError(f"{what} belongs to workspace "
                             f"{labels.get(LABEL_WORKSPACE_ID)!r}, not {workspace_id!r}")


async def restorable(objects: ObjectStore, workspace_id: str, archive_key: str,
                     expected_sha256: str) -> ObjectMeta:
    """The meta of the archive, once it may be restored (see the module's guarantees); its
    sha256 is the expected one, lower case."""
    check_workspace_id(workspace_id)
    expected = expected_sha256.lower()
    if not SHA256.match(expected):
        raise PermanentError(f"invalid sha256 {expected_sha256!r}")
    meta = await objects.head(archive_key)
    if meta is None:
        raise PermanentError(f"archive {archive_key} of {workspace_id} does not exist")
    if meta.format != ARCHIVE_FORMAT:
        raise PermanentError(f"archive {archive_key} has unknown format {meta.format!r}")
    if meta.sha256 != expected:
        raise IntegrityError(f"archive {archive_key}: stored meta says sha256 "
                             f"{meta.sha256}, expected {expected}")
    return meta
