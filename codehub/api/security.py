"""Who may call the admin API: bearer tokens, and the token-less loopback mode's rules.

Guarantees (the package docstring states them for the whole API):
- A presented token's SHA-256 is compared with `hmac.compare_digest` against every
  configured token's digest, with no early exit.
- Without a token: only direct loopback clients (no Forwarded/X-Forwarded-For), a loopback
  Host, no Origin, Sec-Fetch-Site at most `none`, JSON bodies only; otherwise 403/415.
- `authenticate` returns the actor the audit log names (audit.token_actor, or loopback).
- `check_exposure` refuses to start with no token on a non-loopback listener.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Sequence

from aiohttp import web

from .. import audit
from ..config import Config, ConfigError
from ..openapi import (
    ApiError,
)
from .replies import Context

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

# --- authentication ----------------------------------------------------------------------


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def token_matches(presented: str, digests: Sequence[bytes]) -> bool:
    """True when `presented` is one of the tokens. Every digest is compared, even after a
    match; digests are of equal length, so compare_digest's time says nothing either."""
    mine = token_digest(presented)
    found = False
    for expected in digests:
        found |= hmac.compare_digest(mine, expected)
    return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_PORT = re.compile(r"[0-9]{1,5}")


def is_loopback_host_header(value: str) -> bool:
    """True when a Host header names this machine's loopback: `localhost`, an address in
    127.0.0.0/8 or `[::1]`, each with an optional port. Nothing a DNS server (and so a
    rebinding attacker) answers for: no other name, not even `*.localhost`."""
    host = value.strip().lower()
    if host.startswith("["):
        literal, sep, rest = host[1:].partition("]")
        if not sep or (rest and not (rest[:1] == ":" and _PORT.fullmatch(rest[1:]))):
            return False
        try:
            return ipaddress.IPv6Address(literal).is_loopback
        except ValueError:
            return False
    name, sep, port = host.partition(":")
    if sep and _PORT.fullmatch(port) is None:
        return False  # also an unbracketed IPv6 address
    if name == "localhost":
        return True
    try:
        return ipaddress.IPv4Address(name).is_loopback
    except ValueError:
        return False


def _one(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, [])
    if len(values) > 1:
        raise ApiError(403, "cross_site" if name != "Host" else "forbidden_host",
                       f"more than one {name} header")
    return values[0] if values else None


def _guard_tokenless(request: web.Request) -> None:
    """The no-token mode's browser rules (module docstring): loopback Host, sent by no other
    origin, JSON only."""
    host = _one(request, "Host")
    if host is None or not is_loopback_host_header(host):
        raise ApiError(403, "forbidden_host",
                       "no admin token is configured: the admin API answers only requests "
                       "addressed to a loopback Host (localhost, 127.0.0.1, [::1]); got "
                       f"{'none' if host is None else repr(host[:100])}")
    # No web page has any business calling the API without a token, not even one of the
    # API's own origin: in path mode that origin also serves every workspace's pages.
    origin = _one(request, "Origin")
    if origin is not None:
        raise ApiError(403, "cross_site",
                       "no admin token is configured: refusing a request a web page sent "
                       f"(Origin {origin[:100]!r}); use the CLI or curl, or configure a token")
    site = _one(request, "Sec-Fetch-Site")
    if site is not None and site.strip().lower() != "none":
        raise ApiError(403, "cross_site",
                       "no admin token is configured: refusing a request a web page sent "
                       f"(Sec-Fetch-Site {site[:40]!r}); use the CLI or curl, or configure "
                       "a token")
    ctype = request.headers.get("Content-Type")
    media = None if ctype is None else ctype.partition(";")[0].strip().lower()
    if media != "application/json" and (ctype is not None or request.body_exists):
        raise ApiError(415, "unsupported_media_type",
                       "no admin token is configured: a request body must be sent as "
                       "Content-Type: application/json"
                       + ("" if ctype is None else f" (got {ctype[:100]!r})"))


def authenticate(request: web.Request, ctx: Context) -> str:
    """The actor of an authenticated request (audit.py names it); ApiError otherwise."""
    if not ctx.token_digests:
        proxied = "Forwarded" in request.headers or "X-Forwarded-For" in request.headers
        if request.remote is None or not is_loopback(request.remote) or proxied:
            raise ApiError(403, "api_disabled",
                           "no admin token is configured (auth.admin_tokens): the admin "
                           "API only answers direct loopback clients")
        _guard_tokenless(request)
        return audit.LOOPBACK_ACTOR
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise ApiError(401, "unauthorized",
                       "missing credentials: send Authorization: Bearer <admin token>",
                       {"WWW-Authenticate": 'Bearer realm="codehub"'})
    if not token_matches(presented, ctx.token_digests):
        raise ApiError(401, "unauthorized", "invalid admin token",
                       {"WWW-Authenticate": 'Bearer realm="codehub", error="invalid_token"'})
    return audit.token_actor(presented)




def check_exposure(cfg: Config) -> None:
    n = len(cfg.auth.admin_tokens)
    if n:
        log.info("admin API: bearer token required (%d token(s) configured)", n)
        return
    if is_loopback(cfg.server.host):
        log.warning("admin API: no auth.admin_tokens configured; server.host %s is loopback, "
                    "so the API answers direct loopback clients without a token, and only "
                    "requests with a loopback Host (localhost, 127.0.0.0/8, [::1]; else 403 "
                    "forbidden_host), sent by no web page (no Origin, Sec-Fetch-Site at most "
                    "none; else 403 cross_site) and with JSON bodies only (else 415 "
                    "unsupported_media_type): a web page cannot drive it (CSRF, DNS "
                    "rebinding)", cfg.server.host)
        return
    log.error("admin API: no auth.admin_tokens configured and server.host %s is not "
              "loopback: refusing to start", cfg.server.host)
    raise ConfigError(
        f"auth.admin_tokens: empty while server.host={cfg.server.host!r} is not a loopback "
        "address; set a token (e.g. CODEHUB_AUTH__ADMIN_TOKENS) or listen on 127.0.0.1")


