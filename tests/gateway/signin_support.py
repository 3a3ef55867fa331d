"""A gateway with `[auth.oidc]` in front of the echo workspace and a real oidc-provider.

`signin_stack(...)` starts the provider (tests/harness/oidc.py) with the gateway's
callback and signed-out URLs registered, then the gateway on that port (path mode, or host
mode with `host_mode=True`). Owners are emails: alice@example.test (in the provider's
codehub-admins group, so an admin here) and bob@other.test.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from gateway_support import SIGNING_KEY, Stack, Upstream, open_stack
from harness import oidc, services

from codehub.config import AuthConfig, OidcConfig, ServerConfig

ALICE = "alice@example.test"
BOB = "bob@other.test"
CALLBACK = "/_codehub/auth/callback"
SIGNED_OUT = "/_codehub/auth/signed-out"


def oidc_config(issuer: str, **changes: Any) -> OidcConfig:
    return replace(OidcConfig(
        issuer=issuer, client_id=oidc.CLIENT_ID, client_secret=oidc.CLIENT_SECRET,
        scopes=["openid", "email", "profile", "groups"], admin_groups=["codehub-admins"]),
        **changes)


async def signin_stack(database_url: str, up: Upstream, tmp_path: Path, *,
                       host_mode: bool = False, https: bool = False,
                       provider: oidc.OidcProvider | None = None, issuer: str = "",
                       extra_clients: list[dict[str, Any]] | None = None, **oidc_changes: Any,
                       ) -> AsyncIterator[tuple[Stack, oidc.OidcProvider | None]]:
    """`issuer`: another provider's (a test's own); else a new oidc-provider is started.
    `https`: the public URL says https (TLS ends at a proxy in front; requests are plain).
    `extra_clients`: more clients registered at the started provider."""
    port = services.free_port()
    scheme = "https" if https else "http"
    main = f"{scheme}://localhost:{port}" if host_mode else f"{scheme}://127.0.0.1:{port}"
    if provider is None and not issuer:
        provider = oidc.start_oidc_provider([main + CALLBACK],
                                            post_logout_redirect_uris=[main + SIGNED_OUT],
                                            extra_clients=extra_clients)
    try:
        auth = AuthConfig(signing_keys=[SIGNING_KEY], oidc=oidc_config(
            issuer or (provider.issuer if provider else ""), **oidc_changes))
        extra: dict[str, Any] = {"server": ServerConfig(public_url=main)}
        if host_mode:
            extra["workspace_host"] = f"{{id}}.ws.localhost:{port}"
        async for s in open_stack(database_url, up, tmp_path, port=port, auth_config=auth,
                                  **extra):
            yield s, provider
    finally:
        if provider is not None:
            provider.close()


class LoopbackNames(AbstractResolver):
    """*.localhost is loopback, as in Chromium (the system resolver knows only localhost)."""

    def __init__(self) -> None:
        self._system = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host == "localhost" or host.endswith(".localhost"):
            return [{"hostname": host, "host": "127.0.0.1", "port": port,
                     "family": socket.AF_INET, "proto": 0, "flags": socket.AI_NUMERICHOST}]
        return await self._system.resolve(host, port, family)

    async def close(self) -> None:
        await self._system.close()


def browser() -> aiohttp.ClientSession:
    """A client with a cookie jar like a browser's (cookies of IP hosts kept) that takes
    *.localhost for loopback."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                 connector=aiohttp.TCPConnector(resolver=LoopbackNames()))


def cookie_named(hop_cookies: list[str], name: str) -> str:
    """The Set-Cookie header of `name` among a response's, or ""."""
    return next((c for c in hop_cookies if c.startswith(name + "=")), "")
