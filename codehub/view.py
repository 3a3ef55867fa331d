"""A workspace as CodeHub shows it to programs and people: the admin API's JSON and the
self-service page's (one serialiser for both).

Guarantees:
- Times are ISO 8601 UTC with a `Z` (microseconds); None stays None.
- TTLs and the home size limit shown are the effective values: the row's own, else the
  configured default. No secret (access nonce, keys) is ever part of it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from .config import Config
from .model import Workspace


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def workspace_json(ws: Workspace, cfg: Config) -> dict[str, Any]:
    """A workspace as the API shows it (README "Admin API"): TTLs are the effective values."""
    archive = None if ws.archive_key is None else {
        "key": ws.archive_key, "size": ws.archive_size, "sha256": ws.archive_sha256,
        "created_at": iso(ws.archive_created_at)}
    error = None if ws.error_message is None else {
        "message": ws.error_message, "count": ws.error_count, "at": iso(ws.error_at)}
    progress = None if ws.progress_phase is None else {
        "phase": ws.progress_phase, "done": ws.progress_done or 0, "total": ws.progress_total}
    return {
        "id": ws.id, "owner": ws.owner, "image": ws.image_ref,
        "desired_state": ws.desired_state.value, "status": ws.status.value,
        "operation": ws.operation.value, "last_access_at": iso(ws.last_access_at),
        "warm_ttl_seconds": (cfg.reconciler.default_warm_ttl if ws.warm_ttl_seconds is None
                             else ws.warm_ttl_seconds),
        "cold_ttl_seconds": (cfg.reconciler.default_cold_ttl if ws.cold_ttl_seconds is None
                             else ws.cold_ttl_seconds),
        "home_size_limit_mib": (cfg.docker.home_size_limit_mib if ws.home_size_limit_mib is None
                                else ws.home_size_limit_mib),
        "archive": archive, "error": error, "progress": progress,
        "created_at": iso(ws.created_at), "updated_at": iso(ws.updated_at),
    }
