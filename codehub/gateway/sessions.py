"""Sign-in sessions and sign-in flows: signed cookies, checked without a database.

Guarantees:
- A session is the cookie `codehub_session` on CodeHub's main origin (HttpOnly,
  SameSite=Lax, Secure when the request came over HTTPS or server.public_url is https),
  holding a JWT signed with HS256 by joserfc: purpose `session`, the person, whether they
  are an admin, `iat` and `exp` (iat + auth.oidc.session_ttl; the cookie's Max-Age is the
  same). A sign-in flow is the cookie `codehub_signin` (ten minutes) holding purpose
  `flow`, `state`, `nonce`, the PKCE verifier and the local path to return to. Neither can
  stand in for the other (the purpose is checked).
- Both are scoped so no workspace ever receives them (`Scope`): Path=/_codehub/auth/ (a
  path mode workspace under /w/{id}/ is not sent them); on HTTPS in host mode they are
  `__Host-` prefixed (host-only, Path=/), so a workspace origin under the same parent
  domain cannot plant one. An upstream's Set-Cookie of these names is dropped (auth.py
  COOKIE_NAMES).
- Keys are `auth.signing_keys` (or data_dir/signing.key, codehub/signing.py): the first
  signs, every key verifies, so a key rotation keeps sessions alive as access links do.
- Checking a session is a signature check plus a dict lookup (`NotBefore`): no database.
  A session issued before its person's "not before" time is refused. The admin API's
  per-person revocation writes that time to PostgreSQL (revocations.py) and the gateway
  copies the recent ones into this table every few seconds; the table is bounded (at most
  one entry per person) and lives in memory.
- A sign-out ends its own session for good: the session's id (`jti`) is recorded in
  PostgreSQL until the session would have expired (revocations.py), and every gateway
  refuses it once it has read the record (its own at once, the others within
  revocations.REFRESH). A copy of the cookie taken before the sign-out opens nothing after.
- A value that is malformed, forged, expired, of the wrong purpose or without an id
  verifies as None.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from joserfc import errors as jose_errors
from joserfc import jwt
from joserfc.jwk import OctKey

from ..signing import SigningKeys
from .auth import FLOW_COOKIE, SESSION_COOKIE
from .oidc import Flow, Identity

AUTH_PATH = "/_codehub/auth/"
FLOW_TTL = 600
_HEADER = {"alg": "HS256", "typ": "JWT"}
_MAX_VALUE = 4096


@dataclass(frozen=True, slots=True)
class Scope:
    """The names and path of the session and flow cookies of one deployment."""

    session: str
    flow: str
    path: str

    @classmethod
    def of(cls, host_mode: bool, https: bool) -> Scope:
        if host_mode and https:
            return cls("__Host-" + SESSION_COOKIE, "__Host-" + FLOW_COOKIE, "/")
        return cls(SESSION_COOKIE, FLOW_COOKIE, AUTH_PATH)


@dataclass(frozen=True, slots=True)
class Session:
    person: str
    admin: bool
    issued_at: int
    expires_at: int
    sid: str = ""  # the session's own id (jti): what a sign-out revokes


@dataclass(frozen=True, slots=True)
class PendingFlow:
    flow: Flow
    next_path: str
    expires_at: int


class NotBefore:
    """Per person, the earliest `iat` a session may have (revocation)."""

    def __init__(self) -> None:
        self._times: dict[str, int] = {}

    def revoke(self, person: str, at: int) -> None:
        self._times[person] = max(at, self._times.get(person, 0))

    def allows(self, person: str, issued_at: int) -> bool:
        return issued_at >= self._times.get(person, 0)


class Ended:
    """Sessions ended by a sign-out (by id) until they would have expired anyway: bounded
    by the sign-outs of one session lifetime."""

    def __init__(self) -> None:
        self._until: dict[str, int] = {}

    def end(self, sid: str, expires_at: int) -> None:
        self._until[sid] = expires_at

    def prune(self, now: float) -> None:
        for sid in [s for s, until in self._until.items() if until < now]:
            del self._until[sid]

    def __contains__(self, sid: str) -> bool:
        return sid in self._until


class Signer:
    """Signs and verifies the session and flow cookies. `now` returns Unix seconds."""

    def __init__(self, keys: SigningKeys, now: Callable[[], float]) -> None:
        self._keys = [OctKey.import_key(k) for k in keys.keys]
        self.now = now
        self.not_before = NotBefore()
        self.ended = Ended()

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(_HEADER, claims, self._keys[0], algorithms=["HS256"])

    def _verify(self, value: str | None, purpose: str) -> dict[str, Any] | None:
        if not value or len(value) > _MAX_VALUE:
            return None
        for key in self._keys:
            try:
                token = jwt.decode(value, key, algorithms=["HS256"])
            except jose_errors.BadSignatureError:
                continue
            except (jose_errors.JoseError, ValueError, TypeError):
                return None
            registry = jwt.JWTClaimsRegistry(
                now=lambda: int(self.now()), p={"essential": True, "value": purpose},
                exp={"essential": True}, iat={"essential": True})
            try:
                registry.validate(token.claims)
            except jose_errors.JoseError:
                return None
            return token.claims
        return None

    def session(self, identity: Identity, ttl: int) -> tuple[str, Session]:
        now = int(self.now())
        s = Session(identity.person, identity.admin, now, now + ttl, secrets.token_urlsafe(12))
        return self._sign({"p": "session", "sub": s.person, "adm": s.admin, "iat": now,
                           "exp": s.expires_at, "jti": s.sid}), s

    def check_session(self, value: str | None) -> Session | None:
        claims = self._verify(value, "session")
        if claims is None:
            return None
        person, admin, sid = claims.get("sub"), claims.get("adm"), claims.get("jti")
        if not isinstance(person, str) or not person or not isinstance(admin, bool) or (
                not isinstance(sid, str) or not sid):
            return None
        s = Session(person, admin, int(claims["iat"]), int(claims["exp"]), sid)
        if s.sid in self.ended or not self.not_before.allows(s.person, s.issued_at):
            return None
        return s

    def flow(self, flow: Flow, next_path: str) -> str:
        now = int(self.now())
        return self._sign({"p": "flow", "st": flow.state, "nn": flow.nonce,
                           "cv": flow.verifier, "nx": next_path, "iat": now,
                           "exp": now + FLOW_TTL})

    def check_flow(self, value: str | None) -> PendingFlow | None:
        claims = self._verify(value, "flow")
        if claims is None:
            return None
        parts = [claims.get(k) for k in ("st", "nn", "cv", "nx")]
        if not all(isinstance(p, str) and p for p in parts):
            return None
        state, nonce, verifier, next_path = (str(p) for p in parts)
        return PendingFlow(Flow(state, nonce, verifier), next_path, int(claims["exp"]))
