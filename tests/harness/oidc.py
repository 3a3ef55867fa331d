"""A real OpenID Connect provider for tests: npm's oidc-provider as a child node process.

Guarantees:
- ``start_oidc_provider(redirect_uris)`` installs the pinned package (tests/harness/oidc/
  package.json and package-lock.json, ``npm ci``) into build/oidc-provider/ of the
  repository once per lock file (node and npm apt-get installed when missing and root),
  starts ``node provider.js`` on a free loopback port and
  returns once its discovery document answers (or raises ServiceError with its log).
- The provider has two users, ``alice`` (groups developers, codehub-admins) and ``bob``
  (developers), with the passwords in ``USERS``, and the confidential client ``codehub``
  (``CLIENT_SECRET``, client_secret_basic, PKCE required) whose redirect URIs are the ones
  given; ``extra_clients`` adds more. Its login and consent forms are its own HTML forms
  (fields ``login``, ``password``; buttons ``#sign-in``, ``#authorize``).
- Its RS256 signing keys are made here (``keys``); ``rotate()`` restarts it on the same
  port with a new key of a new kid (the old one dropped): what an identity provider's key
  rotation looks like to a relying party that cached the old key set.
- ``close()`` stops the process and deletes its temporary directory; idempotent.
- ``walk`` follows a URL as a browser would over plain HTTP, filling in the provider's
  own login, consent and logout forms: the same forms a Playwright test fills in.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp
from joserfc.jwk import RSAKey

from .services import (
    LOOPBACK,
    PORT_ATTEMPTS,
    Service,
    ServiceError,
    _Child,
    _port_taken,
    _wait_until,
    ensure_command,
    free_port,
)

SOURCE = Path(__file__).resolve().parent / "oidc"
INSTALL_DIR = Path(__file__).resolve().parents[2] / "build" / "oidc-provider"
CLIENT_ID = "codehub"
CLIENT_SECRET = "codehub-test-secret"
USERS = {"alice": "alice-password", "bob": "bob-password"}
_FILES = ("package.json", "package-lock.json", "provider.js")


def install() -> Path:
    """build/oidc-provider with the pinned oidc-provider installed (npm ci, once per lock
    file; concurrent test processes wait for each other)."""
    npm = ensure_command("npm", "npm")
    digest = hashlib.sha256(b"".join((SOURCE / f).read_bytes() for f in _FILES)).hexdigest()
    INSTALL_DIR.mkdir(parents=True, exist_ok=True)
    stamp = INSTALL_DIR / f".installed-{digest[:16]}"
    with open(INSTALL_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists():
            return INSTALL_DIR
        for f in _FILES:
            shutil.copyfile(SOURCE / f, INSTALL_DIR / f)
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--omit=dev"],
                              cwd=INSTALL_DIR, capture_output=True, text=True, timeout=600,
                              check=False)
        if done.returncode != 0:
            raise ServiceError(f"npm ci of oidc-provider failed:\n{done.stdout}{done.stderr}")
        for old in INSTALL_DIR.glob(".installed-*"):
            old.unlink()
        stamp.touch()
    return INSTALL_DIR


def new_signing_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": uuid.uuid4().hex[:12], "use": "sig",
                                                 "alg": "RS256"}, private=True)


def _discovery_answers(port: int) -> bool:
    import http.client

    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
    try:
        conn.request("GET", "/.well-known/openid-configuration")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class OidcProvider(Service):
    """``issuer``: http://127.0.0.1:PORT; ``keys``: its signing keys, private."""

    kind = "oidc-provider"

    def __init__(self, redirect_uris: list[str], post_logout_redirect_uris: list[str],
                 extra_clients: list[dict[str, Any]], id_token_ttl: int) -> None:
        super().__init__()
        self.redirect_uris = redirect_uris
        self.post_logout_redirect_uris = post_logout_redirect_uris
        self.extra_clients = extra_clients
        self.id_token_ttl = id_token_ttl
        self.keys = [new_signing_key()]
        self.port = 0
        self.issuer = ""
        self._child: _Child | None = None
        self._dir = Path()

    @property
    def kid(self) -> str:
        """The kid of the key it signs with now."""
        return str(self.keys[0].kid)

    def _run(self) -> None:
        assert self._tmpdir is not None
        config = self._tmpdir / "config.json"
        config.write_text(json.dumps({
            "port": self.port, "issuer": self.issuer,
            "keys": [k.as_dict(private=True) for k in self.keys],
            "redirect_uris": self.redirect_uris,
            "post_logout_redirect_uris": self.post_logout_redirect_uris,
            "clients": self.extra_clients, "id_token_ttl": self.id_token_ttl,
        }))
        node = ensure_command("node", "nodejs")
        self._child = _Child([node, str(self._dir / "provider.js"), str(config)],
                             self._tmpdir / "provider.log", cwd=self._dir,
                             env={**os.environ, "NODE_ENV": "test"})
        _wait_until(functools.partial(_discovery_answers, self.port), self._child, 60,
                    "oidc-provider")

    def start(self) -> None:
        self._dir = install()
        self._make_tmpdir("codehub-oidc-")
        self._register()
        for attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
            self.issuer = f"http://{LOOPBACK}:{self.port}"
            try:
                self._run()
                break
            except ServiceError as exc:
                self._stop_child()
                if attempt + 1 == PORT_ATTEMPTS or not _port_taken(exc):
                    raise
        self.address = f"{LOOPBACK}:{self.port}"

    def rotate(self) -> None:
        """A new signing key (new kid), the old one gone; same issuer and port."""
        self._stop_child()
        self.keys = [new_signing_key()]
        self._run()

    def _stop_child(self) -> None:
        if self._child is not None:
            self._child.stop()
            self._child = None

    def log_tail(self) -> str:
        return self._child.log_tail() if self._child is not None else ""

    def close(self) -> None:
        self._stop_child()
        super().close()


def start_oidc_provider(redirect_uris: list[str], *,
                        post_logout_redirect_uris: list[str] | None = None,
                        extra_clients: list[dict[str, Any]] | None = None,
                        id_token_ttl: int = 600) -> OidcProvider:
    began = time.monotonic()
    provider = OidcProvider(redirect_uris, post_logout_redirect_uris or [],
                            extra_clients or [], id_token_ttl)
    try:
        provider.start()
        provider.version = "oidc-provider " + json.loads(
            (provider._dir / "node_modules" / "oidc-provider" / "package.json").read_text()
        )["version"]
        provider._ready(began)
        return provider
    except BaseException:
        provider.close()
        raise


# --- a browser's walk through the sign-in, over plain HTTP --------------------------------

_FORM = re.compile(r'<form[^>]*method="post"[^>]*action="([^"]+)"[^>]*>(.*?)</form>',
                   re.S | re.I)
_HIDDEN = re.compile(r'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"', re.I)


@dataclass
class Hop:
    """One response of a walk: what was asked and what came back."""

    method: str
    url: str
    status: int
    location: str
    set_cookie: list[str]
    text: str


async def walk(session: aiohttp.ClientSession, url: str, *, user: str = "",
               password: str = "", stop: Callable[[Hop], bool] | None = None,
               headers: dict[str, str] | None = None, limit: int = 20) -> list[Hop]:
    """Follow `url` as a browser would: redirects, the provider's login form (as `user`),
    its consent and logout confirmations. Stops at the first answer that is neither a
    redirect nor one of those forms, or where `stop` says so. `session` needs a cookie jar
    that keeps cookies of IP hosts (aiohttp.CookieJar(unsafe=True))."""
    hops: list[Hop] = []
    method, data = "GET", None
    accept = {"Accept": "text/html", **(headers or {})}
    for _ in range(limit):
        async with session.request(method, url, data=data, headers=accept,
                                   allow_redirects=False) as resp:
            text = await resp.text(errors="replace")
            hop = Hop(method, url, resp.status, resp.headers.get("Location", ""),
                      resp.headers.getall("Set-Cookie", []), text)
        hops.append(hop)
        if stop is not None and stop(hop):
            return hops
        if hop.location and 300 <= hop.status < 400:
            method, data, url = "GET", None, urljoin(url, hop.location)
            continue
        form = _FORM.search(text) if hop.status == 200 else None
        if form is None:
            return hops
        action, body = form.group(1), form.group(2)
        data = dict(_HIDDEN.findall(body))
        if action.endswith("/login"):
            data.update(login=user, password=password)
        if 'name="logout"' in text:
            data["logout"] = "yes"
        method, url = "POST", urljoin(url, html.unescape(action))
    raise AssertionError(f"no end after {limit} hops: {[(h.status, h.url) for h in hops]}")
