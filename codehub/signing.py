"""Access links and workspace cookies: HMAC-signed, expiring, bound to one workspace's life.

The one module that signs and verifies them: the admin API mints links with it, the
gateway verifies links and mints and verifies cookies with it (and with `[auth.oidc]`
mints the links it hands a signed-in owner).

Guarantees:
- A cookie value is `<expiry>.<nonce>.<mac>`, an access link token
  `<expiry>.<nonce>.<link id>.<mac>`: `expiry` in whole Unix seconds, `nonce` the
  workspace's `access_nonce` when it was minted, `link id` random, `mac` the base64url
  HMAC-SHA256 of a purpose tag, the workspace id, the nonce, the link id and the expiry.
  The purpose tag differs between links and cookies, so neither can stand in for the
  other, and a token of one workspace never verifies for another.
- Bound to a workspace's life: every workspace row carries a random `access_nonce`, made
  when the row is made and replaced by `revoke-access`. A credential is good only while
  its nonce is the row's: a workspace deleted and re-created with the same id, or one
  whose access was revoked, refuses every earlier link and cookie. Verifying the MAC
  needs no database; comparing the nonce uses the route table's copy of the row (one
  hint away from the database), so a forged token never costs a database read.
- An access link is used once: its link id is recorded (`Store.use_link`) when it is
  exchanged for a cookie; the same link again is refused (Verdict.USED).
- Key rotation: `SigningKeys.keys[0]` signs, every key verifies. Add a new key first in
  the list, keep the old one until the longest cookie made with it expired, then drop it.
- Verification is constant time in the MAC (hmac.compare_digest) and allocates a few
  small strings: it runs on every proxied request (and a verified cookie is cached).
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

from .config import Config

KEY_FILE = "signing.key"
_LINK = b"codehub-link\0"
_COOKIE = b"codehub-cookie\0"
_MAC_LENGTH = 43
_MAX_PART = 64


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
    REVOKED = "revoked"  # 403: of an earlier life of the workspace, or revoked
    USED = "used"  # 403: an access link already exchanged


@dataclass(frozen=True, slots=True)
class Credential:
    """A checked link or cookie. `nonce` (and `link_id`, `expiry`) only when OK."""

    verdict: Verdict
    nonce: str = ""
    expiry: int = 0
    link_id: str = ""


MISSING = Credential(Verdict.MISSING)
INVALID = Credential(Verdict.INVALID)


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


def _mac(key: bytes, purpose: bytes, workspace_id: str, nonce: str, link_id: str,
         expiry: int) -> str:
    msg = b"%s%s\0%s\0%s\0%d" % (purpose, workspace_id.encode(), nonce.encode(),
                                  link_id.encode(), expiry)
    return base64.urlsafe_b64encode(hmac.digest(key, msg, hashlib.sha256)).rstrip(b"=").decode()


def _sign(keys: SigningKeys, purpose: bytes, workspace_id: str, nonce: str, link_id: str,
          expiry: int) -> str:
    mac = _mac(keys.keys[0], purpose, workspace_id, nonce, link_id, expiry)
    middle = f"{nonce}.{link_id}" if link_id else nonce
    return f"{expiry}.{middle}.{mac}"


def _part_ok(part: str) -> bool:
    return 0 < len(part) <= _MAX_PART and part.isascii() and part.replace("-", "").replace(
        "_", "").isalnum()


def _verify(keys: SigningKeys, purpose: bytes, workspace_id: str, token: str | None,
            now: float, *, link: bool) -> Credential:
    if not token:
        return MISSING
    parts = token.split(".")
    if len(parts) != (4 if link else 3):
        return INVALID
    head, nonce, mac = parts[0], parts[1], parts[-1]
    link_id = parts[2] if link else ""
    if (not head.isdigit() or len(head) > 12 or len(mac) != _MAC_LENGTH
            or not _part_ok(nonce) or (link and not _part_ok(link_id))):
        return INVALID
    expiry = int(head)
    for key in keys.keys:
        if hmac.compare_digest(_mac(key, purpose, workspace_id, nonce, link_id, expiry), mac):
            if now >= expiry:
                return Credential(Verdict.EXPIRED)
            return Credential(Verdict.OK, nonce, expiry, link_id)
    return INVALID


def new_nonce() -> str:
    """A fresh access nonce (what the database also makes, for rows made without one)."""
    return secrets.token_hex(16)


def mint_access_link(keys: SigningKeys, workspace_id: str, nonce: str, ttl: float,
                     now: float) -> str:
    """A token for `?access=<token>` on the workspace's entry URL, valid for `ttl` seconds
    from `now` (Unix seconds) and once. `nonce` is the workspace row's access_nonce."""
    return _sign(keys, _LINK, workspace_id, nonce, secrets.token_urlsafe(12), int(now + ttl))


def link_expiry(token: str) -> int:
    """The Unix second a token (link or cookie) stops being valid."""
    return int(token.partition(".")[0])



def verify_access_link(keys: SigningKeys, workspace_id: str, token: str | None,
                       now: float) -> Credential:
    return _verify(keys, _LINK, workspace_id, token, now, link=True)


def mint_cookie(keys: SigningKeys, workspace_id: str, nonce: str, ttl: float,
                now: float) -> str:
    """The value of the workspace cookie set when an access link is opened."""
    return _sign(keys, _COOKIE, workspace_id, nonce, "", int(now + ttl))


def verify_cookie(keys: SigningKeys, workspace_id: str, value: str | None,
                  now: float) -> Credential:
    return _verify(keys, _COOKIE, workspace_id, value, now, link=False)
