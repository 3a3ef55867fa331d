"""`ROUTES`: the only declaration of the API's paths, parameters, bodies and replies.

Guarantees:
- The same `Field`s validate requests and produce `GET /api/v1/openapi.json`
  (`build_document`, openapi.py); every route lists the error replies its shape implies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..model import Status
from ..openapi import (
    Body,
    Field,
    Reply,
    Route,
    document,
)
from .handlers import (
    create_access_link,
    create_workspace,
    delete_workspace,
    get_workspace,
    list_audit,
    list_workspaces,
    openapi_json,
    patch_workspace,
    restore_workspace,
    retry_workspace,
    revoke_access,
    revoke_sessions,
)
from .schemas import (
    HOME_MIN_MIB,
    ID_PATTERN,
    ID_SCHEMA,
    IMAGE_PATTERN,
    LINK_TTL_MAX,
    LINK_TTL_MIN,
    OWNER_PATTERN,
    PAGE_DEFAULT,
    PAGE_MAX,
    PREFIX,
    SCHEMAS,
    TTL_SCHEMA,
    VERSION,
)

log = logging.getLogger(__name__)

# --- the table ---------------------------------------------------------------------------

_ID_PARAM = Field("id", ID_SCHEMA, "Workspace id (lower-case DNS label, 1-63 characters).",
                  required=True)
_DESIRED_DOC = "The tier the reconciler should move the workspace to."
_WARM_TTL = Field("warm_ttl_seconds", TTL_SCHEMA,
                  "Idle seconds before RUNNING steps down to WARM; null: the global default.")
_COLD_TTL = Field("cold_ttl_seconds", TTL_SCHEMA,
                  "Idle seconds before WARM steps down to COLD; null: the global default.")
_HOME_SIZE = Field("home_size_limit_mib",
                   {"type": ["integer", "null"], "minimum": HOME_MIN_MIB, "maximum": 1 << 30},
                   "Size of the home in MiB (its own file system); null: the global "
                   "docker.home_size_limit_mib. Applies to the next home made: the first "
                   "provision, or the next restore.")


def _route(method: str, path: str, name: str, summary: str, handler: Any,
           ok: Sequence[Reply], *, conflict: str | None = None, **kw: Any) -> Route:
    """A Route with the error replies its shape implies (400/401/403/404/409/413/415)."""
    replies = list(ok)
    has_input = bool(kw.get("path_params") or kw.get("query") or kw.get("body"))
    if has_input:
        replies.append(Reply(400, "Invalid parameter or body.", "Error"))
    if kw.get("auth", True):
        replies.append(Reply(401, "Missing or invalid admin token.", "Error"))
        replies.append(Reply(403, "No token configured, and the client is not a direct "
                             "loopback client (api_disabled), the Host is not a loopback "
                             "name or address (forbidden_host), or a web page sent the "
                             "request: Origin, or Sec-Fetch-Site other than none "
                             "(cross_site).", "Error"))
    if kw.get("path_params"):
        replies.append(Reply(404, "No such workspace.", "Error"))
    if conflict:
        replies.append(Reply(409, conflict, "Error"))
    if kw.get("body"):
        replies.append(Reply(413, "Request body too large.", "Error"))
    if kw.get("auth", True):
        replies.append(Reply(415, "No token configured, and the request has a body or a "
                             "Content-Type that is not application/json "
                             "(unsupported_media_type).", "Error"))
        # every authenticated route reads the database
        replies.append(Reply(503, "The database is unavailable; retry (Retry-After).",
                             "Error"))
    return Route(method, path, name, summary, handler, tuple(replies), **kw)


ROUTES: tuple[Route, ...] = (
    _route("POST", "/workspaces", "createWorkspace", "Create a workspace", create_workspace,
           [Reply(201, "Created; the reconciler provisions it.", "Workspace")],
           conflict="A workspace with this id exists.",
           body=Body((
               Field("id", ID_SCHEMA, "Workspace id; generated (ws-<hex>) when left out."),
               Field("owner", {"type": "string", "minLength": 1, "maxLength": 128,
                               "pattern": OWNER_PATTERN}, "Owner (a user name).",
                     required=True),
               Field("image", {"type": "string", "minLength": 1, "maxLength": 255,
                               "pattern": IMAGE_PATTERN},
                     "Image reference; default docker.workspace_image."),
               Field("desired_state", {"type": "string", "enum": ["RUNNING", "WARM"],
                                       "default": "RUNNING"}, _DESIRED_DOC),
               _WARM_TTL, _COLD_TTL, _HOME_SIZE), "The new workspace.")),
    _route("GET", "/workspaces", "listWorkspaces", "List workspaces (by id, paged)",
           list_workspaces,
           [Reply(200, "A page of workspaces ordered by id.", "WorkspacePage")],
           query=(
               Field("status", {"type": "string", "enum": [s.value for s in Status]},
                     "Only workspaces with this status."),
               Field("owner", {"type": "string", "minLength": 1, "maxLength": 128,
                               "pattern": OWNER_PATTERN}, "Only workspaces of this owner."),
               Field("limit", {"type": "integer", "minimum": 1, "maximum": PAGE_MAX,
                               "default": PAGE_DEFAULT}, "Page size."),
               Field("cursor", {"type": "string", "minLength": 1, "maxLength": 128,
                                "pattern": r"^[A-Za-z0-9_-]+$"},
                     "next_cursor of the previous page."))),
    _route("GET", "/workspaces/{id}", "getWorkspace", "One workspace", get_workspace,
           [Reply(200, "The workspace.", "Workspace")], path_params=(_ID_PARAM,)),
    _route("PATCH", "/workspaces/{id}", "updateWorkspace",
           "Change desired state and/or TTLs", patch_workspace,
           [Reply(200, "Updated; desired_state unchanged.", "Workspace"),
            Reply(202, "desired_state changed; the reconciler works towards it.",
                  "Workspace")],
           conflict="Not allowed in the workspace's state (being deleted; COLD needs a "
                    "restore).",
           path_params=(_ID_PARAM,),
           body=Body((
               Field("desired_state", {"type": "string", "enum": ["RUNNING", "WARM", "COLD"]},
                     _DESIRED_DOC + " RUNNING/WARM of a COLD workspace: use restore."),
               _WARM_TTL, _COLD_TTL, _HOME_SIZE), "What to change (at least one field).",
               min_fields=1)),
    _route("DELETE", "/workspaces/{id}", "deleteWorkspace", "Delete a workspace",
           delete_workspace,
           [Reply(202, "desired_state is DELETED; the reconciler purges it, then the row "
                  "goes (idempotent).", "Workspace")], path_params=(_ID_PARAM,)),
    _route("POST", "/workspaces/{id}/restore", "restoreWorkspace",
           "Restore a COLD workspace to WARM (or RUNNING)", restore_workspace,
           [Reply(202, "Restore requested.", "Workspace")],
           conflict="Not COLD, in ERROR, or being deleted.", path_params=(_ID_PARAM,),
           body=Body((Field("start", {"type": "boolean", "default": False},
                            "Continue to RUNNING once restored."),),
                     "Optional options.", optional=True)),
    _route("POST", "/workspaces/{id}/retry", "retryWorkspace",
           "Return a workspace in ERROR to the status it failed from", retry_workspace,
           [Reply(202, "Back to its previous status; the failed operation resumes.",
                  "Workspace")],
           conflict="Not in ERROR, or being deleted.", path_params=(_ID_PARAM,)),
    _route("POST", "/workspaces/{id}/access-links", "createAccessLink",
           "Mint a signed, expiring link that opens the workspace in a browser",
           create_access_link, [Reply(201, "The link.", "AccessLink")],
           conflict="Being deleted.", path_params=(_ID_PARAM,),
           body=Body((Field("ttl_seconds", {"type": "integer", "minimum": LINK_TTL_MIN,
                                            "maximum": LINK_TTL_MAX},
                            "Seconds the link stays valid; default auth.link_ttl."),),
                     "Optional options.", optional=True)),
    _route("POST", "/workspaces/{id}/revoke-access", "revokeAccess",
           "Invalidate every access link and cookie of the workspace", revoke_access,
           [Reply(200, "Revoked: every gateway refuses the earlier links and cookies once "
                  "it has the hint (or at the latest after gateway.route_ttl).",
                  "Workspace")], path_params=(_ID_PARAM,)),
    _route("POST", "/people/{person}/revoke-sessions", "revokeSessions",
           "End every sign-in session of a person (and, optionally, their workspace access)",
           revoke_sessions,
           [Reply(200, "Revoked: every gateway refuses the person's earlier sessions within "
                  "5 s.", "SessionRevocation")],
           path_params=(Field("person", {"type": "string", "minLength": 1, "maxLength": 128,
                                         "pattern": OWNER_PATTERN},
                              "The person, as sign-in names them (auth.oidc.user_claim) and "
                              "as workspaces' owner.", required=True),),
           body=Body((Field("workspaces", {"type": "boolean"},
                            "Also revoke access to every workspace the person owns (their "
                            "links and cookies stop working)."),),
                     "Optional options.", optional=True)),
    _route("GET", "/audit", "listAudit", "The audit log, newest first (paged)", list_audit,
           [Reply(200, "A page of audit entries, newest first.", "AuditPage")],
           query=(
               Field("workspace_id", ID_SCHEMA, "Only entries about this workspace."),
               Field("actor", {"type": "string", "minLength": 1, "maxLength": 64,
                               "pattern": r"^[A-Za-z0-9:._@+-]+$"}, "Only entries of this actor."),
               Field("limit", {"type": "integer", "minimum": 1, "maximum": PAGE_MAX,
                               "default": PAGE_DEFAULT}, "Page size."),
               Field("cursor", {"type": "string", "minLength": 1, "maxLength": 19,
                                "pattern": r"^[1-9][0-9]*$"},
                     "next_cursor of the previous page."))),
    _route("GET", "/openapi.json", "getOpenApi", "This document (no token needed)",
           openapi_json, [Reply(200, "The OpenAPI 3.1 document.")], auth=False),
)

DESCRIPTION = (
    "CodeHub's admin API. Declarative: requests change a workspace's desired state or "
    "TTLs and return at once; the reconciler does the work. Ids: " + ID_PATTERN + ". "
    "A COLD workspace comes back only through restore. Errors: "
    '{"error": {"code", "message"}}.')


def build_document() -> dict[str, Any]:
    return document(ROUTES, prefix=PREFIX, title="CodeHub admin API", version=VERSION,
                    description=DESCRIPTION, schemas=SCHEMAS)


