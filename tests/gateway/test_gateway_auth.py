"""Access links and workspace cookies (codehub/signing.py, gateway/access.py, handler.py)."""

from __future__ import annotations

import json
import stat
import time
from datetime import UTC, datetime
from pathlib import Path

from gateway_support import ADMIN_TOKEN, SIGNING_KEY, Stack, Upstream, client, open_stack

from codehub import signing
from codehub.clock import FakeClock
from codehub.config import AuthConfig, Config, ServerConfig
from codehub.gateway import auth
from codehub.model import Status
from codehub.signing import SigningKeys, Verdict

KEYS = SigningKeys((b"new-key", b"old-key"))


async def mint_link(stack: Stack, workspace_id: str = "echo", **body: object) -> dict[str, str]:
    async with client() as http, http.post(
            stack.url(f"/api/v1/workspaces/{workspace_id}/access-links"), json=body or None,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        assert resp.status == 201, await resp.text()
        data: dict[str, str] = await resp.json()
        return data


async def test_access_link_sets_a_scoped_http_only_cookie_and_redirects_clean(
        stack: Stack) -> None:
    await stack.add()
    link = await mint_link(stack, ttl_seconds=60)
    assert link["url"].startswith(stack.base + "/w/echo/?access=")
    async with client() as http, http.get(link["url"] + "&keep=1", allow_redirects=False) as r:
        assert r.status == 303
        assert r.headers["Location"] == "/w/echo/?keep=1"
        assert r.headers["Cache-Control"] == "no-store"
        cookie = r.headers["Set-Cookie"]
    assert cookie.startswith(f"{auth.COOKIE_NAME}=")
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "path", "max-age", "samesite"} <= attrs
    assert "Path=/w/echo/" in cookie and "SameSite=Lax" in cookie
    assert "secure" not in attrs  # plain HTTP and no https public_url: not Secure
    value = cookie.split(";")[0].split("=", 1)[1]
    async with client() as http, http.get(stack.url("/w/echo/"), headers={
            "Cookie": f"{auth.COOKIE_NAME}={value}"}) as resp:
        assert resp.status == 200


async def test_cookie_is_secure_when_the_public_url_is_https_behind_a_tls_proxy(
        database_url: str, echo_upstream: Upstream, tmp_path: Path) -> None:
    async for stack in open_stack(database_url, echo_upstream, tmp_path,
                                  server=ServerConfig(public_url="https://ide.example.org")):
        await stack.add()
        link = await mint_link(stack, ttl_seconds=60)
        assert link["url"].startswith("https://ide.example.org/w/echo/?access=")
        # The proxy in front ended TLS: the request reaches us as plain HTTP.
        path = link["url"].removeprefix("https://ide.example.org")
        async with client() as http, http.get(stack.url(path), allow_redirects=False) as r:
            assert r.status == 303
            cookie = r.headers["Set-Cookie"]
        attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"secure", "httponly", "samesite"} <= attrs


async def test_minting_needs_the_admin_token_and_an_existing_workspace(stack: Stack) -> None:
    await stack.add()
    async with client() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            async with http.post(stack.url("/api/v1/workspaces/echo/access-links"),
                                 headers=headers) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == "unauthorized"
        async with http.post(stack.url("/api/v1/workspaces/nope/access-links"),
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            assert resp.status == 404
        async with http.post(stack.url("/api/v1/workspaces/echo/access-links"),
                             json={"ttl_seconds": 0},
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            assert resp.status == 400


async def test_no_cookie_is_401(stack: Stack) -> None:
    await stack.add()
    async with client() as http:
        async with http.get(stack.url("/w/echo/"), headers={"Accept": "text/html"}) as resp:
            assert resp.status == 401
            assert "access link" in await resp.text()
        async with http.get(stack.url("/w/echo/_codehub/events")) as resp:
            assert resp.status == 401


async def test_another_workspaces_cookie_is_403(stack: Stack) -> None:
    await stack.add()
    await stack.add("other", status=Status.WARM)
    async with client() as http, http.get(stack.url("/w/echo/"),
                                          headers={"Cookie": stack.cookie("other")}) as resp:
        assert resp.status == 403


async def test_expired_cookie_and_expired_link_are_403(stack: Stack) -> None:
    await stack.add()
    nonce = stack.nonces["echo"]
    old = signing.mint_cookie(stack.signing, "echo", nonce, 10, time.time() - 60)
    link = signing.mint_access_link(stack.signing, "echo", nonce, 10, time.time() - 60)
    async with client() as http:
        async with http.get(stack.url("/w/echo/"),
                            headers={"Cookie": f"{auth.COOKIE_NAME}={old}"}) as resp:
            assert resp.status == 403
            assert "expired" in await resp.text()
        async with http.get(stack.url(f"/w/echo/?access={link}"), allow_redirects=False
                            ) as resp:
            assert resp.status == 403
            assert "Set-Cookie" not in resp.headers


async def test_forged_cookies_are_403(stack: Stack) -> None:
    await stack.add()
    nonce = stack.nonces["echo"]
    good = signing.mint_cookie(stack.signing, "echo", nonce, 3600, time.time())
    expiry, _, mac = good.split(".")
    forged = [
        f"{int(expiry) + 1}.{nonce}.{mac}",  # extended expiry
        f"{expiry}.{nonce}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",  # flipped MAC
        f"{expiry}.{'0' * len(nonce)}.{mac}",  # another nonce
        signing.mint_cookie(SigningKeys((b"attacker",)), "echo", nonce, 3600, time.time()),
        signing.mint_access_link(stack.signing, "echo", nonce, 3600, time.time()),  # a link
        "garbage", "1.2.3", "", f"{expiry}.{mac}",
    ]
    async with client() as http:
        for value in forged:
            async with http.get(stack.url("/w/echo/"),
                                headers={"Cookie": f"{auth.COOKIE_NAME}={value}"}) as resp:
                assert resp.status in (401, 403), value


def test_rotated_keys_the_first_signs_and_all_verify() -> None:
    now = time.time()
    n = signing.new_nonce()

    def verdict(keys: SigningKeys, wid: str, value: str | None, at: float) -> Verdict:
        return signing.verify_cookie(keys, wid, value, at).verdict

    by_old = signing.mint_cookie(SigningKeys((b"old-key",)), "w1", n, 60, now)
    by_new = signing.mint_cookie(KEYS, "w1", n, 60, now)
    assert verdict(SigningKeys((b"new-key",)), "w1", by_new, now) is Verdict.OK
    assert verdict(KEYS, "w1", by_old, now) is Verdict.OK
    assert signing.verify_cookie(KEYS, "w1", by_old, now).nonce == n
    assert verdict(SigningKeys((b"new-key",)), "w1", by_old, now) is Verdict.INVALID
    assert verdict(KEYS, "w2", by_new, now) is Verdict.INVALID
    assert verdict(KEYS, "w1", by_new, now + 61) is Verdict.EXPIRED
    assert verdict(KEYS, "w1", None, now) is Verdict.MISSING


async def test_a_cookie_and_the_cookie_a_link_gives_expire_on_the_gateways_clock(
        database_url: str, echo_upstream: Upstream, tmp_path: Path) -> None:
    """Expiry is read from the injected Clock: a FakeClock moved past a cookie's lifetime
    refuses it (also when it was verified, and cached, before), with no wait. The clock
    starts at the real time: the admin API mints the link on the system's."""
    clock = FakeClock(datetime.now(UTC))
    async for stack in open_stack(database_url, echo_upstream, tmp_path, clock=clock,
                                  auth_config=AuthConfig(signing_keys=[SIGNING_KEY],
                                                         admin_tokens=[ADMIN_TOKEN],
                                                         cookie_ttl=600)):
        await stack.add()
        short = stack.cookie(ttl=60)
        link = await mint_link(stack, ttl_seconds=30)
        async with client() as http:
            async with http.get(link["url"], allow_redirects=False) as resp:
                assert resp.status == 303
                given = resp.headers["Set-Cookie"].split(";")[0]
            for cookie in (short, given):
                async with http.get(stack.url("/w/echo/"), headers={"Cookie": cookie}) as r:
                    assert r.status == 200
            await clock.advance(61)
            async with http.get(stack.url("/w/echo/"), headers={"Cookie": short}) as resp:
                assert resp.status == 403
                assert "expired" in await resp.text()
            async with http.get(stack.url("/w/echo/"), headers={"Cookie": given}) as resp:
                assert resp.status == 200  # 600 s from the link's use, on the same clock
            await clock.advance(540)
            async with http.get(stack.url("/w/echo/"), headers={"Cookie": given}) as resp:
                assert resp.status == 403
                assert "expired" in await resp.text()


async def test_the_gateway_cookie_never_reaches_the_workspace(stack: Stack) -> None:
    await stack.add()
    cookie = stack.cookie()
    async with client() as http, http.get(stack.url("/w/echo/"), headers={
            "Cookie": f"a=1; {cookie}; b=2"}) as resp:
        echo = json.loads(await resp.text())
    sent = [v for k, v in echo["headers"] if k.lower() == "cookie"]
    assert sent == ["a=1; b=2"]
    async with client() as http, http.get(stack.url("/w/echo/"), headers={
            "Cookie": cookie}) as resp:
        echo = json.loads(await resp.text())
    assert [v for k, v in echo["headers"] if k.lower() == "cookie"] == []


def test_a_signing_key_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    cfg = Config(data_dir=str(tmp_path), auth=AuthConfig())
    first = signing.load_keys(cfg)
    path = tmp_path / signing.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert signing.load_keys(cfg) == first
    assert len(first.keys[0]) >= 32
