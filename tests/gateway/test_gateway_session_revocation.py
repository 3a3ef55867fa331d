"""Per-person session revocation through the admin API (codehub/revocations.py, the API's
revokeSessions, the gateway's refresh task), against the real provider and database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from gateway_support import ECHO_ID, Stack, Upstream
from harness import oidc
from signin_support import ALICE, BOB, browser, signin_stack

from codehub import revocations


@pytest.fixture
async def signin(database_url: str, echo_upstream: Upstream, tmp_path: Path,
                 ) -> AsyncIterator[tuple[Stack, oidc.OidcProvider]]:
    async for s, provider in signin_stack(database_url, echo_upstream, tmp_path):
        assert provider is not None
        yield s, provider


async def revoke(stack: Stack, person: str, **body: bool) -> dict[str, object]:
    async with aiohttp.ClientSession() as api, api.post(
            stack.url(f"/api/v1/people/{person}/revoke-sessions"), json=body) as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


def reaches_provider(hops: list[oidc.Hop], provider: oidc.OidcProvider) -> bool:
    return any(h.location.startswith(provider.issuer) for h in hops)


async def opens_without_provider(http: aiohttp.ClientSession, stack: Stack,
                                 provider: oidc.OidcProvider, wid: str) -> bool:
    """The session alone (not a workspace cookie the browser may hold) opens `wid`."""
    hops = await oidc.walk(http, stack.url(f"/_codehub/auth/open/{wid}?path=/"),
                           stop=lambda h: h.location.startswith(provider.issuer))
    return not reaches_provider(hops, provider) and hops[-1].status == 200


async def test_a_revoked_persons_sessions_are_refused_by_the_gateway_within_seconds(
        signin: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, provider = signin
    for wid, owner in ((ECHO_ID, ALICE), ("alice-b", ALICE), ("alice-c", ALICE),
                       ("bob-a", BOB), ("bob-b", BOB)):
        await stack.add(wid, owner=owner)
    async with browser() as alice, browser() as bob:
        await oidc.walk(alice, stack.url("/w/echo/"), user="alice",
                        password=oidc.USERS["alice"])
        await oidc.walk(bob, stack.url("/w/bob-a/"), user="bob", password=oidc.USERS["bob"])
        assert await opens_without_provider(alice, stack, provider, "alice-b")
        answer = await revoke(stack, ALICE)
        assert answer["person"] == ALICE and answer["workspaces_revoked"] == []
        started = time.monotonic()
        while await opens_without_provider(alice, stack, provider, "alice-c"):
            assert time.monotonic() - started < revocations.REFRESH + 5, "still accepted"
            await asyncio.sleep(0.5)
        # the workspace cookies already made stay (workspaces not asked for) ...
        assert (await oidc.walk(alice, stack.url("/w/echo/")))[-1].status == 200
        # ... and another person's session is untouched
        assert await opens_without_provider(bob, stack, provider, "bob-b")
        # signing in again gives a new session, which is not refused
        hops = await oidc.walk(alice, stack.url("/w/alice-c/"), user="alice",
                               password=oidc.USERS["alice"])
        assert hops[-1].status == 200


async def test_revoking_with_workspaces_also_ends_the_workspace_cookies_made(
        signin: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, provider = signin
    await stack.add(ECHO_ID, owner=ALICE)
    await stack.add("bob-a", owner=BOB)
    async with browser() as alice:
        await oidc.walk(alice, stack.url("/w/echo/"), user="alice",
                        password=oidc.USERS["alice"])
        answer = await revoke(stack, ALICE, workspaces=True)
        assert answer["workspaces_revoked"] == [ECHO_ID]
        started = time.monotonic()
        while (await oidc.walk(alice, stack.url("/w/echo/"), stop=lambda h: h.location
                               .startswith(provider.issuer)))[-1].status == 200:
            assert time.monotonic() - started < revocations.REFRESH + 5, "cookie still works"
            await asyncio.sleep(0.5)
    ws = await stack.store.get("bob-a")
    assert ws is not None and ws.access_nonce == stack.nonces["bob-a"]  # untouched
    async with aiohttp.ClientSession() as api, api.get(
            stack.url("/api/v1/audit"), params={"limit": "5"}) as resp:
        entries = (await resp.json())["items"]
    assert entries[0]["action"] == "revokeSessions"
    assert entries[0]["detail"] == {"person": ALICE, "workspaces": True}
