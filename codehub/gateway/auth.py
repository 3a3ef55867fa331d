"""Access links and workspace cookies: HMAC-signed, expiring, bound to one workspace.

Guarantees:
- An access link token and a cookie value are `<expiry>.<mac>`: `expiry` in whole Unix
  seconds, `mac` the base64url HMAC-SHA256 of a purpose tag, the workspace id and the
  expiry. The purpose tag differs between links and cookies, so neither can stand in
  for the other, and a token of one workspace never verifies for another.
- Key rotation: `SigningKeys.keys[0]` signs, every key verifies. Add a new key first in
  the list, keep the old one until the longest cookie made with it expired, then drop it.
- Verification is constant time in the MAC (hmac.compare_digest), needs no database and
  allocates a few small strings: it runs on every proxied request.
- With no `auth.signing_keys` configured, one key is generated on first start and kept in
  `data_dir/signing.key` (mode 0600); later starts (and replicas sharing data_dir) reuse
  it. Replicas without a shared data_dir must be given `auth.signing_keys`.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..config import Config

COOKIE_NAME = "codehub_ws"
KEY_FILE = "signing.key"
_LINK = b"codehub-link\0"
_COOKIE = b"codehub-cookie\0"


@dataclass(frozen=True, slots=True)
class SigningKeys:
    """HMAC keys: the first signs, all verify."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("at least one signing key is needed")


class Verdict(enum.Enum):
    OK = "ok"
    MISSING = "missing"  # 401: no credential at all
    INVALID = "invalid"  # 403: forged, another workspace's, or malformed
    EXPIRED = "expired"  # 403: was valid once


def load_keys(cfg: Config) -> SigningKeys:
    """The configured keys, or the one kept in data_dir/signing.key (made if missing)."""
    if cfg.auth.signing_keys:
        return SigningKeys(tuple(k.encode() for k in cfg.auth.signing_keys))
    return SigningKeys((_key_file(cfg.data_path / KEY_FILE),))


def _key_file(path: Path) -> bytes:
    try:
        data = path.read_bytes().strip()
    except FileNotFoundError:
        data = b""
    if data:
        return data
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process made the file first: use theirs
    except FileExistsError:
        os.unlink(tmp)
        return path.read_bytes().strip()
    os.unlink(tmp)
    return key


def _mac(key: bytes, purpose: bytes, workspace_id: str, expiry: int) -> str:
    msg = b"%s%s\0%d" % (purpose, workspace_id.encode(), expiry)
    return base64.urlsafe_b64encode(hmac.digest(key, msg, hashlib.sha256)).rstrip(b"=").decode()


def _sign(keys: SigningKeys, purpose: bytes, workspace_id: str, expiry: int) -> str:
    return f"{expiry}.{_mac(keys.keys[0], purpose, workspace_id, expiry)}"


def _verify(keys: SigningKeys, purpose: bytes, workspace_id: str, token: str | None,
            now: float) -> Verdict:
    if not token:
        return Verdict.MISSING
    head, sep, mac = token.partition(".")
    if not sep or not head.isdigit() or len(head) > 12 or len(mac) != 43:
        return Verdict.INVALID
    expiry = int(head)
    for key in keys.keys:
        if hmac.compare_digest(_mac(key, purpose, workspace_id, expiry), mac):
            return Verdict.OK if now < expiry else Verdict.EXPIRED
    return Verdict.INVALID


def mint_access_link(keys: SigningKeys, workspace_id: str, ttl: float, now: float) -> str:
    """A token for `/w/{workspace_id}/?access=<token>`, valid for `ttl` seconds from `now`
    (Unix seconds). The admin API calls this for POST .../access-links."""
    return _sign(keys, _LINK, workspace_id, int(now + ttl))


def link_expiry(token: str) -> int:
    """The Unix second a token (link or cookie) stops being valid."""
    return int(token.partition(".")[0])


def link_path(workspace_id: str, token: str) -> str:
    """The path (and query) of an access link, to put after the public base URL."""
    return f"/w/{workspace_id}/?access={token}"


def verify_access_link(keys: SigningKeys, workspace_id: str, token: str | None,
                       now: float) -> Verdict:
    return _verify(keys, _LINK, workspace_id, token, now)


def mint_cookie(keys: SigningKeys, workspace_id: str, ttl: float, now: float) -> str:
    """The value of the workspace cookie set when an access link is opened."""
    return _sign(keys, _COOKIE, workspace_id, int(now + ttl))


def verify_cookie(keys: SigningKeys, workspace_id: str, value: str | None,
                  now: float) -> Verdict:
    return _verify(keys, _COOKIE, workspace_id, value, now)


def cookie_path(workspace_id: str) -> str:
    return f"/w/{workspace_id}/"


_NEEDLE = COOKIE_NAME + "="


def split_cookie_header(header: str | None) -> tuple[str | None, str | None]:
    """(our cookie's value, the Cookie header without it) from a request's Cookie header.

    The remainder is None when nothing else is left. When several of our cookies are sent
    (a browser may hold more than one), the first one is returned and all are removed.
    Shaped for the hot path: a header without our cookie costs one substring search.
    """
    if header is None:
        return None, None
    if _NEEDLE not in header:
        return None, header
    value: str | None = None
    kept = []
    for part in header.split(";"):
        item = part.strip()
        if item.startswith(_NEEDLE):
            if value is None:
                value = item[len(_NEEDLE):]
        elif item:
            kept.append(item)
    return value, "; ".join(kept) if kept else None
