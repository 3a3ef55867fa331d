r"""Where a workspace is served: its browser origin, and which origin a request is for.

Two modes (README.md "Browser isolation"):
- **Path mode** (`gateway.workspace_host` empty; single-user and development setups):
  every workspace is served from CodeHub's own origin under `/w/{id}/`. Workspaces then
  share an origin, and a page that one serves can reach the others through the browser
  (its scripts are same-origin with them). The start-up log says so.
- **Host mode** (`gateway.workspace_host = "{id}.ws.example.com"`): each workspace is
  served at the root of an origin of its own, `<scheme of server.public_url>://<id>.ws.
  example.com`. The browser's same-origin policy then keeps one workspace's pages away
  from another's responses and cookies; `/w/{id}/...` on the main origin redirects there.

Guarantees:
- `classify(host)` needs no database and no allocation beyond a few strings: a Host that
  ends in the workspace suffix is a workspace origin only when the label before it is a
  valid workspace id (a lower-case DNS label); any other Host under the suffix is
  MALFORMED (404). The main origin is the public URL's host, or any loopback name or
  address (local probes and the CLI); every other Host is UNKNOWN (404) in host mode.
- `own_origin` is what a browser puts in `Origin` for a page of that workspace: the
  workspace's origin in host mode; the public URL's origin, or (none configured) the
  scheme and Host the request arrived with, in path mode.
- Default ports are never part of an origin (`https://x:443` is `https://x`).
- `is_local(target)` is true only for a path (and query) that a browser resolves to a
  path of the SAME origin: one leading slash after the browser's own normalisation (dot
  segments removed, `%2e` counted as a dot, `\` as `/`), no control character. Every
  redirect the gateway builds from a request's path or a `path` parameter goes through it.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from urllib.parse import urlsplit

from .model import WORKSPACE_ID

_DEFAULT_PORT = {"http": ":80", "https": ":443"}
_ENCODED_DOT = re.compile("%2e", re.IGNORECASE)


def browser_path(path: str) -> str:
    """The path a browser resolves `path` to (RFC 3986 5.2.4 dot segments removed; `%2e`
    is a dot and `\\` a slash there, as WHATWG URL parsing does for http(s))."""
    segments = _ENCODED_DOT.sub(".", path.replace("\\", "/")).split("/")
    out: list[str] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments[1:], start=1):
        if seg in (".", ".."):
            if seg == ".." and out:
                out.pop()
            if i == last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def is_local(target: str) -> bool:
    """Whether a redirect to `target` stays on this origin (module guarantees)."""
    if not target.startswith("/") or not target.isprintable():
        return False
    path = target.split("?", 1)[0].split("#", 1)[0]
    return not browser_path(path).startswith("//") and not path.startswith(("//", "/\\"))


class HostKind(enum.Enum):
    MAIN = "main"
    WORKSPACE = "workspace"
    MALFORMED = "malformed"  # under the workspace suffix, but no valid id
    UNKNOWN = "unknown"


def _strip_default_port(scheme: str, netloc: str) -> str:
    default = _DEFAULT_PORT.get(scheme, "")
    return netloc[:-len(default)] if default and netloc.endswith(default) else netloc


def is_loopback_host(host: str) -> bool:
    """A Host header (port allowed) naming this machine's loopback: localhost, *.localhost,
    127.0.0.0/8 or [::1]."""
    name = host.lower()
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Origins:
    """The origins of one deployment (built once from the configuration)."""

    def __init__(self, public_url: str, workspace_host: str) -> None:
        parts = urlsplit(public_url) if public_url else None
        self.public_origin = ""
        self.main_host = ""
        if parts is not None and parts.scheme and parts.netloc:
            self.main_host = _strip_default_port(parts.scheme, parts.netloc.lower())
            self.public_origin = f"{parts.scheme}://{self.main_host}"
        self.scheme = parts.scheme if parts is not None and parts.scheme else "http"
        self.host_mode = bool(workspace_host)
        # "{id}.ws.example.com:8443" -> ".ws.example.com:8443" (checked by config/fields.py)
        self.suffix = _strip_default_port(self.scheme, workspace_host[4:].lower())
        self.secure = self.scheme == "https"
        # An access link keeps a path the public URL may carry (CodeHub behind /codehub/).
        self.public_base = public_url.rstrip("/")

    def classify(self, host: str | None) -> tuple[HostKind, str]:
        """(kind, workspace id or "") of a request's Host header, in host mode."""
        if not host:
            return HostKind.UNKNOWN, ""
        name = _strip_default_port(self.scheme, host.lower())
        if name.endswith(self.suffix):
            wid = name[:-len(self.suffix)]
            if WORKSPACE_ID.fullmatch(wid):
                return HostKind.WORKSPACE, wid
            return HostKind.MALFORMED, ""
        if name == self.main_host or is_loopback_host(name):
            return HostKind.MAIN, ""
        return HostKind.UNKNOWN, ""

    def workspace_origin(self, workspace_id: str) -> str:
        """The origin a workspace is served at in host mode."""
        return f"{self.scheme}://{workspace_id}{self.suffix}"

    def own_origin(self, workspace_id: str, scheme: str, host: str) -> str:
        """What `Origin` a page of this workspace sends; `scheme` and `host` are those the
        request arrived with (as forwarded by a trusted proxy, if any)."""
        if self.host_mode:
            return self.workspace_origin(workspace_id)
        if self.public_origin:
            return self.public_origin
        return f"{scheme}://{_strip_default_port(scheme, host.lower())}"

    def prefix(self, workspace_id: str) -> str:
        """The path the workspace's root is served under: "" in host mode."""
        return "" if self.host_mode else f"/w/{workspace_id}"

    def access_url(self, workspace_id: str, token: str, request_origin: str = "",
                   path: str = "/") -> str:
        """The URL of an access link to `path` (a local path, query allowed) of the
        workspace; `request_origin` serves when no public URL is set. The token's
        characters (digits, letters, `-_.`) need no quoting."""
        root = (self.workspace_origin(workspace_id) if self.host_mode
                else f"{self.public_base or request_origin}/w/{workspace_id}")
        return f"{root}{path}{'&' if '?' in path else '?'}access={token}"
