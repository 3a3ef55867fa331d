"""Credentials bound to a workspace's life (codehub/signing.py, gateway/handler.py, api/):
a re-created id refuses the old ones, revoke-access cuts every replica within one hint, an
access link works once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from gateway_support import ADMIN_TOKEN, Stack, Upstream, client, open_stack, wait_for

from codehub.gateway import auth
from codehub.hints import RedisHintBus

BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def mint(stack: Stack, workspace_id: str = "echo") -> str:
    async with client() as http, http.post(
            stack.url(f"/api/v1/workspaces/{workspace_id}/access-links"), json={},
            headers=BEARER) as resp:
        assert resp.status == 201, await resp.text()
        url: str = (await resp.json())["url"]
    return url


async def exchange(url: str) -> tuple[int, str, str]:
    """(status, cookie header to send or "", body) of opening an access link."""
    async with client() as http, http.get(url, allow_redirects=False) as resp:
        cookie = resp.cookies.get(auth.COOKIE_NAME)
        return resp.status, f"{auth.COOKIE_NAME}={cookie.value}" if cookie else "", \
            await resp.text()


async def status_with(stack: Stack, cookie: str) -> int:
    async with client() as http, http.get(stack.url("/w/echo/"),
                                          headers={"Cookie": cookie}) as resp:
        return resp.status


async def test_an_access_link_works_once(stack: Stack) -> None:
    await stack.add()
    link = await mint(stack)
    status, cookie, _ = await exchange(link)
    assert status == 303 and cookie
    assert await status_with(stack, cookie) == 200
    status, again, body = await exchange(link)  # replayed, by anyone without the cookie
    assert (status, again) == (403, "")
    assert "already used" in body
    # Two browsers racing with one link: exactly one gets a cookie.
    second = await mint(stack)
    results = await asyncio.gather(*(exchange(second) for _ in range(5)))
    assert sorted(r[0] for r in results) == [303, 403, 403, 403, 403]


async def test_a_link_and_a_cookie_of_a_deleted_then_recreated_id_are_refused(
        stack: Stack) -> None:
    await stack.add()
    _, cookie, _ = await exchange(await mint(stack))
    unused = await mint(stack)
    assert await status_with(stack, cookie) == 200
    # The workspace is deleted; another owner's workspace gets the same id later.
    await stack.store.pool.execute("DELETE FROM workspaces WHERE id = 'echo'")
    await stack.hints.publish("echo")
    await stack.add()
    async with client() as http, http.get(stack.url("/w/echo/"), headers={
            "Cookie": cookie, "Accept": "text/html"}) as resp:
        assert resp.status == 403
        assert "revoked" in await resp.text()
    status, got, body = await exchange(unused)
    assert (status, got) == (403, "") and "no longer valid" in body
    _, fresh, _ = await exchange(await mint(stack))  # the new workspace's own link works
    assert await status_with(stack, fresh) == 200


async def replicas(database_url: str, up: Upstream, tmp_path: Path, redis_url: str,
                   ) -> AsyncIterator[tuple[Stack, Stack]]:
    buses = [RedisHintBus(redis_url), RedisHintBus(redis_url)]
    # A route is trusted for a minute without a hint: a refusal seen sooner came by hint.
    settings = {"route_ttl": 60.0}
    try:
        async for one in open_stack(database_url, up, tmp_path / "a", hints=buses[0],
                                    **settings):
            async for two in open_stack(database_url, up, tmp_path / "b", hints=buses[1],
                                        **settings):
                yield one, two
    finally:
        for bus in buses:
            await bus.close()


async def test_revoke_access_cuts_sessions_sockets_and_unused_links_on_every_replica(
        database_url: str, echo_upstream: Upstream, tmp_path: Path, redis_url: str) -> None:
    async for one, two in replicas(database_url, echo_upstream, tmp_path, redis_url):
        await one.add()
        _, cookie, _ = await exchange(await mint(one))
        unused = (await mint(two)).replace(one.base, two.base)
        for replica in (one, two):  # both have the route cached, with the old nonce
            assert await status_with(replica, cookie) == 200
        sessions = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        sockets = [await sessions.ws_connect(r.url("/w/echo/_echo/ws").replace("http", "ws"),
                                             headers={"Cookie": cookie}) for r in (one, two)]
        for sock in sockets:  # open, relayed sessions on both replicas
            await sock.send_str("hi")
            assert (await sock.receive(timeout=10)).data == "hi"
        async with client() as http, http.post(one.url("/api/v1/workspaces/echo/revoke-access"),
                                               headers=BEARER) as resp:
            assert resp.status == 200, await resp.text()
        for replica in (one, two):
            await wait_for(lambda r=replica, c=cookie: _refused(r, c), timeout=5)
        for sock in sockets:  # and the open sockets were closed by the gateways
            msg = await sock.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
        await sessions.close()
        status, got, _ = await exchange(unused)
        assert (status, got) == (403, "")
        _, fresh, _ = await exchange((await mint(two)).replace(one.base, two.base))
        assert await status_with(two, fresh) == 200 and await status_with(one, fresh) == 200


async def _refused(stack: Stack, cookie: str) -> bool:
    return await status_with(stack, cookie) == 403


async def test_revoking_an_unknown_workspace_is_404(database_url: str, echo_upstream: Upstream,
                                                    tmp_path: Path) -> None:
    async for stack in open_stack(database_url, echo_upstream, tmp_path):
        async with client() as http, http.post(
                stack.url("/api/v1/workspaces/nope/revoke-access"), headers=BEARER) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "not_found"
