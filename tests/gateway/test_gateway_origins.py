"""Browser isolation at the gateway (codehub/origins.py, handler.py, proxy.py):
an origin per workspace in host mode, Origin/Sec-Fetch-Site checks in both modes, and the
headers a workspace and a browser never get from each other."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from gateway_support import ADMIN_TOKEN, Stack, Upstream, client, open_stack
from harness.services import free_port

from codehub import signing
from codehub.config import ServerConfig
from codehub.gateway import auth

BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def origin_of(stack: Stack, workspace_id: str = "echo") -> str:
    return stack.gw.origins.workspace_origin(workspace_id)


def host(stack: Stack, workspace_id: str = "echo") -> str:
    return origin_of(stack, workspace_id).removeprefix("http://")


async def heartbeat(stack: Stack) -> int:
    """The echo server's time of the last request it got, asked directly (not through
    the gateway), so a test can tell whether a refused request reached it."""
    route = await stack.gw.routes.get("echo")
    async with client() as http, http.get(f"http://{route.host}:{route.port}/healthz") as r:
        beat: int = (await r.json())["lastHeartbeat"]
    return beat


async def reached_upstream(stack: Stack, send: object) -> bool:
    before = await heartbeat(stack)
    await asyncio.sleep(0.02)
    await send  # type: ignore[misc]
    return await heartbeat(stack) != before


# --- host mode ---------------------------------------------------------------------------


async def test_host_mode_links_point_at_the_workspace_origin_and_its_cookie_is_host_only(
        hosted: Stack) -> None:
    await hosted.add()
    async with client() as http, http.post(
            hosted.url("/api/v1/workspaces/echo/access-links"), headers=BEARER) as resp:
        url = (await resp.json())["url"]
    assert url.startswith(origin_of(hosted) + "/?access=")
    path = url.removeprefix(origin_of(hosted))
    async with client() as http, http.get(hosted.url(path), allow_redirects=False,
                                          headers={"Host": host(hosted)}) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/"
        set_cookie = resp.headers["Set-Cookie"]
    assert set_cookie.startswith(f"{auth.COOKIE_NAME}=")
    assert "Path=/;" in set_cookie + ";" and "domain" not in set_cookie.lower()
    cookie = set_cookie.split(";")[0]
    async with client() as http, http.get(hosted.url("/a/b?c=1"), headers={
            "Host": host(hosted), "Cookie": cookie}) as resp:
        echo = await resp.json()
    assert echo["raw_path"] == "/a/b?c=1"  # served at the root of its own origin
    names = {k.lower() for k, _ in echo["headers"]}
    assert "x-forwarded-prefix" not in names and "cookie" not in names


async def test_host_mode_https_cookie_is_host_prefixed(
        database_url: str, echo_upstream: Upstream, tmp_path: Path) -> None:
    async for stack in open_stack(database_url, echo_upstream, tmp_path,
                                  server=ServerConfig(public_url="https://ide.example.org"),
                                  workspace_host="{id}.ws.example.org"):
        await stack.add()
        token = signing.mint_access_link(stack.signing, "echo", stack.nonces["echo"], 60,
                                      __import__("time").time())
        async with client() as http, http.get(stack.url(f"/?access={token}"), headers={
                "Host": "echo.ws.example.org"}, allow_redirects=False) as resp:
            set_cookie = resp.headers["Set-Cookie"]
        assert set_cookie.startswith(f"{auth.HOST_COOKIE_NAME}=")
        attrs = {a.strip().split("=")[0].lower() for a in set_cookie.split(";")[1:]}
        assert {"secure", "httponly", "path"} <= attrs and "domain" not in attrs
        assert "Path=/;" in set_cookie + ";"


async def test_main_origin_redirects_a_workspace_path_to_its_origin(hosted: Stack) -> None:
    async with client() as http:
        for path, where in (("/w/echo/x/y?z=1&access=t", "/x/y?z=1&access=t"),
                            ("/w/echo", "/"), ("/w/echo?q=1", "/?q=1")):
            async with http.get(hosted.url(path), allow_redirects=False) as resp:
                assert resp.status == 308, path
                assert resp.headers["Location"] == origin_of(hosted) + where


async def test_workspace_origin_serves_no_api_and_bad_hosts_are_404_without_the_database(
        hosted: Stack) -> None:
    await hosted.add()
    reads: list[str] = []
    real_get = hosted.gw.routes.store.get

    async def counted(workspace_id: str):  # type: ignore[no-untyped-def]
        reads.append(workspace_id)
        return await real_get(workspace_id)

    hosted.gw.routes.store.get = counted  # type: ignore[method-assign]
    port = hosted.base.rsplit(":", 1)[1]
    async with client() as http:
        async with http.get(hosted.url("/api/v1/workspaces"), headers={
                "Host": host(hosted), **BEARER, "Cookie": hosted.cookie()}) as resp:
            assert resp.status == 404 and "workspaces" not in await resp.text()
        for bad in (f"evil.example:{port}", f"a.b.ws.localhost:{port}",
                    f"-x.ws.localhost:{port}", f"{'a' * 64}.ws.localhost:{port}",
                    f"ws.localhost:{port}", f"echo.ws.localhost:{int(port) + 1}"):
            async with http.get(hosted.url("/"), headers={"Host": bad,
                                                          "Cookie": hosted.cookie()}) as resp:
                assert resp.status == 404, bad
        async with http.get(hosted.url("/w/echo/"), allow_redirects=False) as resp:
            assert resp.status == 308  # the main origin (loopback Host) goes to the router
    assert reads == []


async def test_another_workspaces_cookie_opens_nothing_at_this_origin(hosted: Stack) -> None:
    await hosted.add()
    await hosted.add("other")
    async with client() as http, http.get(hosted.url("/"), headers={
            "Host": host(hosted), "Cookie": hosted.cookie("other")}) as resp:
        assert resp.status == 403


# --- both modes: WebSocket Origin and cross-site requests --------------------------------


@pytest.fixture(params=["path", "host"])
async def either(request: pytest.FixtureRequest, database_url: str, echo_upstream: Upstream,
                 tmp_path: Path) -> AsyncIterator[tuple[Stack, str, dict[str, str], str]]:
    """(stack, URL of the echo workspace's root, headers that route there, own origin)."""
    port = free_port()
    settings = {} if request.param == "path" else {
        "workspace_host": f"{{id}}.ws.localhost:{port}"}
    async for stack in open_stack(database_url, echo_upstream, tmp_path, port=port,
                                  server=ServerConfig(public_url=f"http://localhost:{port}"),
                                  **settings):
        await stack.add()
        if request.param == "path":
            yield stack, stack.url("/w/echo/"), {}, f"http://localhost:{port}"
        else:
            yield stack, stack.url("/"), {"Host": host(stack)}, origin_of(stack)


async def test_websocket_from_any_origin_but_its_own_is_refused_before_the_workspace(
        either: tuple[Stack, str, dict[str, str], str]) -> None:
    stack, root, route, own = either
    ws = root.replace("http://", "ws://") + "_echo/ws"
    base = {**route, "Cookie": stack.cookie()}
    sibling = origin_of(stack, "other") if stack.gw.origins.host_mode else "http://other.example"
    async with client() as http:
        for origin in (own, None):  # None: not a browser (curl, the CLI): the cookie decides
            headers = dict(base) if origin is None else {**base, "Origin": origin}
            async with http.ws_connect(ws, headers=headers) as sock:
                await sock.send_str("ping")
                assert (await sock.receive(timeout=10)).data == "ping"
        for headers in ({**base, "Origin": sibling}, {**base, "Origin": "https://evil.example"},
                        {**base, "Origin": "null"},
                        {**base, "Origin": own, "Sec-Fetch-Site": "same-site"}):
            async def attempt(h: dict[str, str] = headers) -> None:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(ws, headers=h)
                assert refused.value.status == 403
            assert not await reached_upstream(stack, attempt()), headers


async def test_state_changing_requests_from_another_origin_are_refused(
        either: tuple[Stack, str, dict[str, str], str]) -> None:
    stack, root, route, own = either
    base = {**route, "Cookie": stack.cookie()}
    sibling = origin_of(stack, "other") if stack.gw.origins.host_mode else "http://other.example"
    async with client() as http:
        for headers in ({**base, "Origin": own, "Sec-Fetch-Site": "same-origin"}, base):
            async with http.post(root + "x", data=b"1", headers=headers) as resp:
                assert resp.status == 200 and (await resp.json())["method"] == "POST"
        for headers in ({**base, "Origin": sibling}, {**base, "Sec-Fetch-Site": "cross-site"},
                        {**base, "Sec-Fetch-Site": "same-site"}):
            async def attempt(h: dict[str, str] = headers) -> None:
                async with http.post(root + "x", data=b"1", headers=h) as resp:
                    assert resp.status == 403
            assert not await reached_upstream(stack, attempt()), headers
        # A cross-site navigation (a link in a mail) is a GET: it passes, with the cookie.
        async with http.get(root, headers={**base, "Sec-Fetch-Site": "cross-site"}) as resp:
            assert resp.status == 200


# --- headers -----------------------------------------------------------------------------

CLAIMS = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Host": "evil.example",
          "X-Forwarded-Proto": "https", "X-Forwarded-Prefix": "/evil",
          "Forwarded": "for=203.0.113.9;host=evil.example", "X-Real-IP": "203.0.113.9"}


def seen(echo: dict[str, object]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in echo["headers"]:  # type: ignore[attr-defined]
        out.setdefault(k.lower(), []).append(v)
    return out


async def test_a_clients_forwarding_claims_never_reach_the_workspace(stack: Stack) -> None:
    await stack.add()
    async with client() as http:
        async with http.get(stack.url("/w/echo/"), headers=stack.headers(**CLAIMS)) as resp:
            got = seen(await resp.json())
        async with http.ws_connect(stack.url("/w/echo/_echo/ws").replace("http", "ws"),
                                   headers=stack.headers(**CLAIMS)) as sock:
            await sock.send_str("headers")
            ws_got = seen({"headers": json.loads((await sock.receive(timeout=10)).data)})
    for headers in (got, ws_got):
        assert headers["x-forwarded-for"] == ["127.0.0.1"]
        assert headers["x-forwarded-host"] == [stack.base.removeprefix("http://")]
        assert headers["x-forwarded-proto"] == ["http"]
        assert headers["x-forwarded-prefix"] == ["/w/echo"]
        assert "forwarded" not in headers and "x-real-ip" not in headers


async def test_a_trusted_proxys_forwarding_headers_are_passed_on(
        database_url: str, echo_upstream: Upstream, tmp_path: Path) -> None:
    async for stack in open_stack(database_url, echo_upstream, tmp_path,
                                  trusted_proxies=["127.0.0.0/8"]):
        await stack.add()
        async with client() as http, http.get(stack.url("/w/echo/"),
                                              headers=stack.headers(**CLAIMS)) as resp:
            got = seen(await resp.json())
        assert got["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
        assert got["x-forwarded-host"] == ["evil.example"]
        assert got["x-forwarded-proto"] == ["https"]
        assert got["x-forwarded-prefix"] == ["/evil/w/echo"]
        assert got["forwarded"] == [CLAIMS["Forwarded"]] and got["x-real-ip"] == ["203.0.113.9"]


async def test_a_workspace_never_sets_codehubs_cookie_nor_widens_a_service_worker(
        stack: Stack) -> None:
    await stack.add()
    query = ("set-cookie=codehub_ws%3Dforged%3B%20Path%3D%2Fw%2Fother%2F"
             "&set-cookie=__Host-codehub_ws%3Dx%3B%20Path%3D%2F"
             "&set-cookie=%20codehub_ws%3Dy"
             "&set-cookie=theirs%3D1&service-worker-allowed=%2F&x-kept=1")
    async with client() as http, http.get(stack.url(f"/w/echo/_echo/headers?{query}"),
                                          headers=stack.headers()) as resp:
        assert resp.status == 200
        assert resp.headers.getall("Set-Cookie") == ["theirs=1"]
        assert "Service-Worker-Allowed" not in resp.headers
        assert resp.headers["X-Kept"] == "1"
