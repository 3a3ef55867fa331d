"""A workspace as CodeHub shows it, the one presenter: the admin API's JSON and the
self-service page's (`workspace_json`), and the state the loading page and the event
stream show (`workspace_state`).

Guarantees:
- Both shapes show a workspace's archive, failure and progress through the model's value
  objects (`ws.archive`, `ws.failure`, `ws.progress`) and the same functions here, so they
  cannot disagree: a value is null when the workspace has none, `progress.done` is 0
  before anything was counted.
- Times are ISO 8601 UTC with a `Z` (microseconds); None stays None.
- TTLs and the home size limit shown are the effective values: the row's own, else the
  configured default. No secret (access nonce, keys) is ever part of either shape.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from .config import Config
from .model import Archive, Failure, Progress, Workspace


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def archive_json(archive: Archive | None) -> dict[str, Any] | None:
    if archive is None:
        return None
    return {"key": archive.key, "size": archive.size, "sha256": archive.sha256,
            "created_at": iso(archive.created_at)}


def failure_json(failure: Failure | None) -> dict[str, Any] | None:
    if failure is None:
        return None
    return {"message": failure.message, "count": failure.count, "at": iso(failure.at)}


def progress_json(progress: Progress | None) -> dict[str, Any] | None:
    if progress is None:
        return None
    return {"phase": progress.phase, "done": progress.done, "total": progress.total}


def workspace_json(ws: Workspace, cfg: Config) -> dict[str, Any]:
    """A workspace as the API shows it (README "Admin API"): TTLs are the effective values."""
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
        "archive": archive_json(ws.archive), "error": failure_json(ws.failure),
        "progress": progress_json(ws.progress),
        "created_at": iso(ws.created_at), "updated_at": iso(ws.updated_at),
    }


def workspace_state(ws: Workspace | None, *, ready: bool = False) -> dict[str, Any]:
    """The workspace as the loading page and the event stream show it; `ready`: the
    gateway can proxy to it and it answers its health check. No workspace: UNKNOWN."""
    if ws is None:
        return {"id": None, "status": "UNKNOWN", "ready": False}
    return {"id": ws.id, "status": ws.status.value, "desired_state": ws.desired_state.value,
            "operation": ws.operation.value, "progress": progress_json(ws.progress),
            "error": failure_json(ws.failure), "ready": ready}
