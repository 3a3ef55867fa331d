"""What a setting is: its declaration (`setting`), the error a bad one raises, and the
checks that the declarations name.

Guarantees:
- `ConfigError` is the only error a bad setting raises; its message is one line that
  names the key.
- Every check returns what is wrong with a value as a sentence, or None; it never raises.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import field
from typing import Any
from urllib.parse import urlsplit

from ..constants import DOCKER_DEFAULT_CAPABILITIES

ENV_PREFIX = "CODEHUB_"


class ConfigError(Exception):
    """A setting is wrong. The message is one line naming the key."""


def setting(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
            choices: tuple[str, ...] | None = None, secret: bool = False,
            check: Callable[[Any], str | None] | None = None) -> Any:
    """Declare one setting: its default, its documentation and its valid range. `check`
    returns what is wrong with a value (None: nothing)."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices, "secret": secret,
            "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_capabilities(value: list[str]) -> str | None:
    bad = [c for c in value if c not in DOCKER_DEFAULT_CAPABILITIES]
    return (f"{', '.join(map(repr, bad))} not in Docker's default set "
            f"({', '.join(DOCKER_DEFAULT_CAPABILITIES)})") if bad else None


def uid_gid(value: str) -> tuple[int, int] | None:
    uid, sep, gid = value.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit()):
        return None
    return int(uid), int(gid)


def home_owner(value: str) -> tuple[int, int]:
    """docker.home_owner as numbers (already checked)."""
    parsed = uid_gid(value)
    assert parsed is not None
    return parsed


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_WORKSPACE_HOST = re.compile(rf"\{{id\}}((?:\.{_LABEL})+)(:[0-9]{{1,5}})?")


def check_workspace_host(value: str) -> str | None:
    if not value:
        return None
    m = _WORKSPACE_HOST.fullmatch(value)
    if m is None or (m.group(2) and not 0 < int(m.group(2)[1:]) < 65536):
        return ("expected {id} followed by a lower-case domain and an optional port, "
                f"e.g. {{id}}.ws.example.com or {{id}}.ws.localhost:8000; got {value!r}")
    return None


def _networks(parse: Callable[[str], object], what: str,
              ) -> Callable[[list[str]], str | None]:
    def check(value: list[str]) -> str | None:
        for cidr in value:
            try:
                parse(cidr)
            except ValueError as exc:
                return f"{cidr!r} is not an {what} network: {exc}"
        return None
    return check


check_ip_networks = _networks(ipaddress.ip_network, "IP")
check_ipv4_networks = _networks(ipaddress.IPv4Network, "IPv4")

def check_issuer(value: str) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or (
            parts.fragment):
        return f"expected an http(s) URL without query or fragment, got {value!r}"
    if parts.scheme == "http" and not is_loopback_name(parts.hostname):
        return f"must be https (http only on loopback), got {value!r}"
    return None


def is_loopback_name(host: str) -> bool:
    """localhost, *.localhost, or a loopback address."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_scopes(value: list[str]) -> str | None:
    if "openid" not in value:
        return "must include openid"
    bad = [s for s in value if not s or any(c.isspace() or c == '"' for c in s)]
    return f"not a scope: {bad[0]!r}" if bad else None


def check_domains(value: list[str]) -> str | None:
    bad = [d for d in value if not d or "@" in d or d != d.strip().lower()]
    return f"expected lower-case domain names without @, got {bad[0]!r}" if bad else None
