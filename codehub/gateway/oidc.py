"""The OpenID Connect relying party: discovery, key sets, the code flow, ID-token checks.

Guarantees:
- The discovery document (`<issuer>/.well-known/openid-configuration`) is fetched on first
  use and cached for `auth.oidc.metadata_ttl`; its `issuer` must equal the configured one
  exactly (OpenID Connect Discovery 4.3), else nothing from it is used.
- The key set (`jwks_uri`) is cached the same way. An ID token whose `kid` is not in it
  makes one fresh fetch (the provider rotated its keys), at most one per
  `auth.oidc.jwks_refetch_interval`, and concurrent sign-ins share one fetch: a flood of
  tokens with made-up key ids costs the provider nothing more. A kid still unknown after
  that fetch is refused.
- `authorization_url` asks for the code flow with PKCE (S256), `state` and `nonce`;
  `exchange` redeems the code at the token endpoint with client_secret_basic and the PKCE
  verifier, over the gateway's HTTP session, each request bounded by `http_timeout`.
- `verify` accepts an ID token only if joserfc verifies its signature with a provider key
  of an asymmetric algorithm the provider advertises (never `none` nor an HMAC), and its
  claims: `iss` the issuer, `aud` containing the client id (and `azp` the client id when
  there are several audiences), `exp` in the future and `iat` not in the future (both
  within `clock_skew`), `sub` present, `nonce` the one of this sign-in. No JOSE is written
  here: every check above is joserfc's.
- `identity` names the person by `user_claim` (an email only when `email_verified` is
  true), refuses people outside `allowed_groups`/`allowed_domains`, and says whether the
  person is an admin (`admins`, `admin_groups`).
- Every refusal is an `OidcError` with a stable `reason` code and a sentence a person can
  read; no token, code or secret is ever part of its message.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
from joserfc import errors as jose_errors
from joserfc import jws, jwt
from joserfc.jwk import KeySet

from ..config import OidcConfig

# Asymmetric JWS algorithms only: a provider's public key must never be usable as an
# HMAC secret, and "none" is no signature.
_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
               "ES512", "EdDSA")
_CLAIM_REASON = {"iss": "wrong_issuer", "aud": "wrong_audience", "exp": "expired",
                 "nonce": "nonce_mismatch", "iat": "issued_in_future", "sub": "no_subject"}


class OidcError(Exception):
    """A sign-in refused: `reason` a stable code, the message a sentence for a person."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Metadata:
    """What the gateway uses of the provider's discovery document."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    end_session_endpoint: str
    algorithms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who signed in, as CodeHub sees it."""

    person: str
    admin: bool


@dataclass(frozen=True, slots=True)
class Flow:
    """One sign-in's secrets: kept in the browser's signed flow cookie, never in a URL but
    `state`, `nonce` and the PKCE challenge."""

    state: str
    nonce: str
    verifier: str

    @classmethod
    def new(cls) -> Flow:
        return cls(secrets.token_urlsafe(24), secrets.token_urlsafe(24),
                   secrets.token_urlsafe(48))

    @property
    def challenge(self) -> str:
        """RFC 7636's S256 transform of the verifier."""
        digest = hashlib.sha256(self.verifier.encode("ascii")).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _string(doc: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = doc.get(key, "")
    if not isinstance(value, str) or (required and not value):
        raise OidcError("bad_discovery", f"The identity provider's discovery document has "
                                         f"no valid {key}.")
    return value


class OidcClient:
    """The relying party of one provider. `now` returns Unix seconds (the Clock's)."""

    def __init__(self, cfg: OidcConfig, session: aiohttp.ClientSession,
                 now: Callable[[], float]) -> None:
        self.cfg = cfg
        self.session = session
        self.now = now
        self._timeout = aiohttp.ClientTimeout(total=cfg.http_timeout)
        self._metadata: Metadata | None = None
        self._metadata_at = 0.0
        self._keys: KeySet | None = None
        self._keys_at = 0.0
        self._fetching = asyncio.Lock()  # concurrent sign-ins share one fetch
        self.key_fetches = 0  # for tests and metrics: how often the key set was fetched

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            async with self.session.get(url, timeout=self._timeout,
                                        allow_redirects=False) as resp:
                if resp.status != 200:
                    raise OidcError("provider_error", f"The identity provider answered "
                                                      f"{resp.status} for its {what}.")
                doc = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise OidcError("provider_unreachable", f"The identity provider's {what} could "
                                                    f"not be read ({type(exc).__name__}).") from exc
        if not isinstance(doc, dict):
            raise OidcError("provider_error", f"The identity provider's {what} is not a JSON "
                                              "object.")
        return doc

    async def metadata(self) -> Metadata:
        now = self.now()
        if self._metadata is not None and now - self._metadata_at < self.cfg.metadata_ttl:
            return self._metadata
        issuer = self.cfg.issuer.rstrip("/")
        doc = await self._get_json(issuer + "/.well-known/openid-configuration",
                                   "discovery document")
        if doc.get("issuer") != self.cfg.issuer:
            raise OidcError("wrong_issuer", "The identity provider's discovery document names "
                                            "another issuer than the one configured.")
        algs = doc.get("id_token_signing_alg_values_supported", ["RS256"])
        self._metadata = Metadata(
            issuer=self.cfg.issuer,
            authorization_endpoint=_string(doc, "authorization_endpoint"),
            token_endpoint=_string(doc, "token_endpoint"),
            jwks_uri=_string(doc, "jwks_uri"),
            end_session_endpoint=_string(doc, "end_session_endpoint", required=False),
            algorithms=tuple(a for a in algs if a in _ALGORITHMS) if isinstance(
                algs, list) else ())
        self._metadata_at = now
        return self._metadata

    async def _fetch_keys(self, meta: Metadata) -> KeySet:
        doc = await self._get_json(meta.jwks_uri, "key set")
        try:
            keys = KeySet.import_key_set(doc)  # type: ignore[arg-type]
        except (jose_errors.JoseError, ValueError, KeyError, TypeError) as exc:
            raise OidcError("provider_error", "The identity provider's key set is not "
                                              "valid.") from exc
        self._keys, self._keys_at = keys, self.now()
        self.key_fetches += 1
        return keys

    def _wants_fetch(self, kid: str | None) -> bool:
        keys, age = self._keys, self.now() - self._keys_at
        if keys is None or age >= self.cfg.metadata_ttl:
            return True
        return kid is not None and age >= self.cfg.jwks_refetch_interval and not any(
            k.kid == kid for k in keys.keys)

    async def _key_set(self, meta: Metadata, kid: str | None) -> KeySet:
        """The cached key set; fetched again when stale, or (rate limited) when it lacks
        `kid`. Callers that wait for a fetch under way use its result."""
        if self._wants_fetch(kid):
            async with self._fetching:
                if self._wants_fetch(kid):
                    return await self._fetch_keys(meta)
        assert self._keys is not None
        return self._keys

    def authorization_url(self, meta: Metadata, redirect_uri: str, flow: Flow) -> str:
        query = urlencode({
            "response_type": "code", "client_id": self.cfg.client_id,
            "redirect_uri": redirect_uri, "scope": " ".join(self.cfg.scopes),
            "state": flow.state, "nonce": flow.nonce, "code_challenge": flow.challenge,
            "code_challenge_method": "S256"})
        sep = "&" if "?" in meta.authorization_endpoint else "?"
        return f"{meta.authorization_endpoint}{sep}{query}"

    async def exchange(self, meta: Metadata, code: str, redirect_uri: str, flow: Flow) -> str:
        """The ID token the token endpoint gives for `code`."""
        auth = aiohttp.encode_basic_auth(*(_form(v) for v in (self.cfg.client_id,
                                                              self.cfg.client_secret)))
        try:
            async with self.session.post(
                    meta.token_endpoint, timeout=self._timeout, allow_redirects=False,
                    headers={"Authorization": auth, "Accept": "application/json"},
                    data={"grant_type": "authorization_code", "code": code,
                          "redirect_uri": redirect_uri, "code_verifier": flow.verifier},
                    ) as resp:
                body = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise OidcError("provider_unreachable", "The identity provider's token endpoint "
                                                    "could not be reached.") from exc
        if status != 200 or not isinstance(body, dict):
            error = body.get("error", "") if isinstance(body, dict) else ""
            raise OidcError("code_refused", f"The identity provider refused the sign-in code "
                                            f"({status}{' ' + str(error)[:60] if error else ''}).")
        token = body.get("id_token")
        if not isinstance(token, str) or not token:
            raise OidcError("no_id_token", "The identity provider sent no ID token.")
        return token

    async def verify(self, meta: Metadata, id_token: str, nonce: str) -> dict[str, Any]:
        """The claims of a valid ID token of this sign-in; OidcError otherwise."""
        try:
            header = jws.extract_compact(id_token.encode("ascii")).headers()
        except (jose_errors.JoseError, ValueError, UnicodeEncodeError) as exc:
            raise OidcError("malformed_token", "The ID token is not a signed JWT.") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in meta.algorithms:
            raise OidcError("bad_algorithm", f"The ID token's algorithm {str(alg)[:16]!r} is "
                                             "not one the provider advertises for ID tokens.")
        keys = await self._key_set(meta, kid if isinstance(kid, str) else None)
        try:
            token = jwt.decode(id_token, keys, algorithms=[alg])
        except jose_errors.InvalidKeyIdError as exc:
            raise OidcError("unknown_key", "The ID token is signed with a key the identity "
                                           "provider does not publish.") from exc
        except (jose_errors.BadSignatureError, jose_errors.DecodeError) as exc:
            raise OidcError("bad_signature", "The ID token's signature is not valid.") from exc
        except jose_errors.JoseError as exc:
            raise OidcError("malformed_token", "The ID token could not be read.") from exc
        self._check_claims(token.claims, nonce)
        return token.claims

    def _check_claims(self, claims: dict[str, Any], nonce: str) -> None:
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self.now()), leeway=self.cfg.clock_skew,
            iss={"essential": True, "value": self.cfg.issuer},
            aud={"essential": True, "value": self.cfg.client_id},
            exp={"essential": True}, iat={"essential": True}, sub={"essential": True},
            nonce={"essential": True, "value": nonce})
        try:
            registry.validate(claims)
        except jose_errors.MissingClaimError as exc:
            reason = "missing_nonce" if exc.claim == "nonce" else "missing_claim"
            raise OidcError(reason, f"The ID token has no {exc.claim!r} claim.") from exc
        except jose_errors.ClaimError as exc:
            raise OidcError(_CLAIM_REASON.get(exc.claim, "invalid_claim"),
                            f"The ID token's {exc.claim!r} claim is not valid for this "
                            "sign-in.") from exc
        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.cfg.client_id:
            raise OidcError("wrong_audience", "The ID token was issued to another party.")

    def identity(self, claims: dict[str, Any]) -> Identity:
        cfg = self.cfg
        person = claims.get(cfg.user_claim)
        verified = claims.get("email_verified") is True
        if not isinstance(person, str) or not person or (
                cfg.user_claim == "email" and not verified):
            raise OidcError("no_identity", f"The identity provider did not send a usable "
                                           f"{cfg.user_claim!r} claim (an email must be "
                                           "verified).")
        raw = claims.get(cfg.groups_claim, [])
        groups = {g for g in raw if isinstance(g, str)} if isinstance(raw, list) else set()
        if cfg.allowed_groups and not groups.intersection(cfg.allowed_groups):
            raise OidcError("not_allowed", "Your account is not in a group allowed to use "
                                           "CodeHub.")
        if cfg.allowed_domains:
            email = claims.get("email")
            domain = email.rpartition("@")[2].lower() if isinstance(email, str) else ""
            if not verified or domain not in cfg.allowed_domains:
                raise OidcError("not_allowed", "Your account's email domain is not allowed "
                                               "to use CodeHub.")
        admin = person in cfg.admins or bool(groups.intersection(cfg.admin_groups))
        return Identity(person, admin)


def _form(value: str) -> str:
    """RFC 6749 2.3.1: client id and secret are form-encoded before Basic encoding."""
    return urlencode({"": value})[1:]
