"""The admin API's constants and JSON Schemas (what `routes.py` declares and openapi.py
documents).

Guarantees:
- Workspace ids match `ID_PATTERN` (model.WORKSPACE_ID, a DNS label), owners
  `OWNER_PATTERN`, images `IMAGE_PATTERN` (a Docker reference); TTLs, link lifetimes and
  page sizes have one bound each, here, used by validation and by the document alike.
"""

from __future__ import annotations

import logging
from typing import Any

from ..model import WORKSPACE_ID, DesiredState, Operation, Status

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
VERSION = "1"

ID_PATTERN = "^" + WORKSPACE_ID.pattern + "$"
OWNER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$"
# A Docker image reference: [registry/]path[:tag][@sha256:digest]. As in Docker, the first
# component is a registry only when it has a dot or a port or is localhost; path
# components are lower case.
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_REGISTRY = rf"(?:{_LABEL}(?:\.{_LABEL})+(?::[0-9]{{1,5}})?|{_LABEL}:[0-9]{{1,5}}|localhost)"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN = (rf"^(?:{_REGISTRY}/)?{_COMPONENT}(?:/{_COMPONENT})*"
                 r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$")
HOME_MIN_MIB = 16  # the smallest home file system (codehub.backends.docker.disks)
TTL_MIN = 30  # seconds; well above the gateway's activity flush interval
TTL_MAX = 10 * 365 * 86400
LINK_TTL_MIN = 10
LINK_TTL_MAX = 30 * 86400
PAGE_DEFAULT = 100
PAGE_MAX = 500
_CAS_TRIES = 5

# --- schemas -----------------------------------------------------------------------------

ID_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": ID_PATTERN}
TTL_SCHEMA = {"type": ["integer", "null"], "minimum": TTL_MIN, "maximum": TTL_MAX}
TIME_SCHEMA = {"type": "string", "format": "date-time"}
TIME_OR_NULL_SCHEMA = {"type": ["string", "null"], "format": "date-time"}


def json_object(props: dict[str, Any], *, nullable: bool = False) -> dict[str, Any]:
    return {"type": ["object", "null"] if nullable else "object", "properties": props,
            "required": list(props), "additionalProperties": False}


SCHEMAS: dict[str, Any] = {
    "Workspace": json_object({
        "id": {"type": "string", "pattern": ID_PATTERN},
        "owner": {"type": "string"},
        "image": {"type": "string"},
        "desired_state": {"type": "string", "enum": [d.value for d in DesiredState]},
        "status": {"type": "string", "enum": [s.value for s in Status]},
        "operation": {"type": "string", "enum": [o.value for o in Operation]},
        "last_access_at": TIME_SCHEMA,
        "warm_ttl_seconds": {"type": "integer", "minimum": 1,
                             "description": "Effective idle seconds before RUNNING -> WARM."},
        "cold_ttl_seconds": {"type": "integer", "minimum": 1,
                             "description": "Effective idle seconds before WARM -> COLD."},
        "home_size_limit_mib": {"type": "integer", "minimum": 0,
                                "description": "Effective size of the home in MiB (0: no "
                                "limit); a change applies to the next home made (provision "
                                "or restore)."},
        "archive": json_object({"key": {"type": "string"},
                            "size": {"type": ["integer", "null"], "minimum": 0},
                            "sha256": {"type": ["string", "null"]},
                            "created_at": TIME_OR_NULL_SCHEMA}, nullable=True),
        "error": json_object({"message": {"type": "string"},
                          "count": {"type": "integer", "minimum": 0},
                          "at": TIME_OR_NULL_SCHEMA}, nullable=True),
        "progress": json_object({"phase": {"type": "string"},
                             "done": {"type": "integer", "minimum": 0},
                             "total": {"type": ["integer", "null"], "minimum": 0}},
                            nullable=True),
        "created_at": TIME_SCHEMA,
        "updated_at": TIME_SCHEMA,
    }),
    "WorkspacePage": json_object({
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Workspace"}},
        "next_cursor": {"type": ["string", "null"],
                        "description": "Pass as `cursor` for the next page; null: last page."},
    }),
    "AccessLink": json_object({"url": {"type": "string"}, "expires_at": TIME_SCHEMA}),
    "SessionRevocation": json_object({
        "person": {"type": "string"},
        "not_before": TIME_SCHEMA,
        "workspaces_revoked": {"type": "array", "items": {"type": "string"}},
    }),
    "AuditEntry": json_object({
        "id": {"type": "integer", "minimum": 1},
        "at": TIME_SCHEMA,
        "actor": {"type": "string", "description": "token:<first 12 hex digits of the "
                  "admin token's SHA-256>, or loopback (no token configured)."},
        "action": {"type": "string", "description": "The operation (operationId)."},
        "workspace_id": {"type": ["string", "null"]},
        "status": {"type": "integer", "description": "The HTTP status answered."},
        "request_id": {"type": "string"},
        "detail": {"type": "object", "description": "The validated request body."},
    }),
    "AuditPage": json_object({
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEntry"}},
        "next_cursor": {"type": ["string", "null"],
                        "description": "Pass as `cursor` for the next (older) page; null: "
                        "last page."},
    }),
    "Error": json_object({"error": json_object({"code": {"type": "string"},
                                        "message": {"type": "string"}})}),
}

