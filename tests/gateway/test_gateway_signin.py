"""Signing in with a real OpenID Connect provider (codehub/gateway/signin.py, sessions.py,
oidc.py): the redirect dance, ownership, admins, logout, both origin modes. The provider's
own login and consent forms are filled in over HTTP (harness.oidc.walk)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from gateway_support import ECHO_ID, Stack, Upstream, client
from harness import oidc
from signin_support import ALICE, BOB, SIGNED_OUT, browser, cookie_named, signin_stack

from codehub import signing
from codehub.gateway import auth
from codehub.model import Status

SESSION = auth.SESSION_COOKIE


@pytest.fixture
async def signin(database_url: str, echo_upstream: Upstream, tmp_path: Path,
                 ) -> AsyncIterator[tuple[Stack, oidc.OidcProvider]]:
    async for s, provider in signin_stack(database_url, echo_upstream, tmp_path):
        assert provider is not None
        yield s, provider


async def test_a_browser_without_a_credential_is_sent_through_sign_in_and_back(
        signin: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, provider = signin
    await stack.add(ECHO_ID, owner=ALICE)
    async with browser() as http:
        hops = await oidc.walk(http, stack.url("/w/echo/some/path?q=1"), user="alice",
                               password=oidc.USERS["alice"])
    first = hops[0]
    assert first.status == 303
    assert first.location.startswith(stack.url("/_codehub/auth/open/echo?path="))
    to_provider = next(h for h in hops if h.location.startswith(provider.issuer + "/auth?"))
    query = parse_qs(urlsplit(to_provider.location).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"]
    assert query["state"] and query["nonce"] and query["response_type"] == ["code"]
    flow = cookie_named(to_provider.set_cookie, auth.FLOW_COOKIE)
    assert "HttpOnly" in flow and "Path=/_codehub/auth/" in flow and "SameSite=Lax" in flow
    callback = next(h for h in hops if h.url.startswith(stack.url("/_codehub/auth/callback")))
    session = cookie_named(callback.set_cookie, SESSION)
    assert callback.status == 303, callback.text
    assert "HttpOnly" in session and "SameSite=Lax" in session
    assert "Path=/_codehub/auth/" in session and "Max-Age=28800" in session
    assert "Secure" not in session  # plain http on loopback
    link = next(h for h in hops if "access=" in h.location)
    assert link.location.startswith(stack.url("/w/echo/some/path?q=1&access="))
    last = hops[-1]
    assert last.status == 200 and last.url == stack.url("/w/echo/some/path?q=1")
    echoed = json.loads(last.text)
    assert echoed["raw_path"] == "/some/path?q=1"
    sent = " ".join(v for k, v in echoed["headers"] if k.lower() == "cookie")
    assert SESSION not in sent and auth.FLOW_COOKIE not in sent and auth.COOKIE_NAME not in sent


async def test_the_credential_made_is_the_access_links_workspace_cookie(
        signin: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = signin
    await stack.add(ECHO_ID, owner=ALICE)
    async with browser() as http:
        hops = await oidc.walk(http, stack.url("/w/echo/"), user="alice",
                               password=oidc.USERS["alice"])
    exchange = next(h for h in hops if "access=" in h.url)
    cookie = cookie_named(exchange.set_cookie, auth.COOKIE_NAME)
    value = cookie.split(";")[0].split("=", 1)[1]
    cred = signing.verify_cookie(stack.signing, ECHO_ID, value, time.time())
    assert cred.verdict is signing.Verdict.OK and cred.nonce == stack.nonces[ECHO_ID]
    assert "Path=/w/echo/" in cookie and "HttpOnly" in cookie


async def test_another_persons_workspace_answers_403_with_a_page(
        signin: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = signin
    await stack.add(ECHO_ID, owner=ALICE)
    async with browser() as http:
        hops = await oidc.walk(http, stack.url("/w/echo/"), user="bob",
                               password=oidc.USERS["bob"])
    last = hops[-1]
    assert last.status == 403
    assert "Not your workspace." in last.text and BOB in last.text
    assert not any("access=" in h.location for h in hops)


async def test_admins_open_any_workspace(signin: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = signin
    await stack.add(ECHO_ID, owner=BOB)
    async with browser() as http:
        hops = await oidc.walk(http, stack.url("/w/echo/"), user="alice",
                               password=oidc.USERS["alice"])
    assert hops[-1].status == 200 and hops[-1].url == stack.url("/w/echo/")


async def test_a_wrong_password_stays_on_the_providers_form(
        signin: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = signin
    await stack.add(ECHO_ID, owner=ALICE)
    async with browser() as http:
        hops = await oidc.walk(http, stack.url("/w/echo/"), user="alice", password="wrong",
                               stop=lambda h: h.status == 401)
    assert hops[-1].status == 401 and "Wrong user name or password." in hops[-1].text
    assert not any(cookie_named(h.set_cookie, SESSION) for h in hops)


async def test_a_session_opens_more_workspaces_without_the_provider(
        signin: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, provider = signin
    await stack.add(ECHO_ID, owner=ALICE)
    await stack.add("alice-two", status=Status.COLD, owner=ALICE)
    async with browser() as http:
        await oidc.walk(http, stack.url("/w/echo/"), user="alice",
                        password=oidc.USERS["alice"])
        hops = await oidc.walk(http, stack.url("/w/alice-two/"))
    assert not any(h.url.startswith(provider.issuer) for h in hops)
    assert hops[-1].status == 502 and "archived" in hops[-1].text.lower()


async def test_logout_ends_the_session_and_the_providers(
        signin: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, provider = signin
    await stack.add(ECHO_ID, owner=ALICE)
    async with browser() as http:
        await oidc.walk(http, stack.url("/w/echo/"), user="alice",
                        password=oidc.USERS["alice"])
        hops = await oidc.walk(http, stack.url("/_codehub/auth/logout"))
        out = hops[0]
        assert out.status == 303 and out.location.startswith(provider.issuer + "/session/end?")
        assert parse_qs(urlsplit(out.location).query)["post_logout_redirect_uri"] == [
            stack.url(SIGNED_OUT)]
        assert cookie_named(out.set_cookie, SESSION).startswith(f'{SESSION}=""')
        assert hops[-1].url == stack.url(SIGNED_OUT) and hops[-1].status == 200
        assert "Signed out." in hops[-1].text
        # Session and provider session both gone: opening a workspace asks for a login.
        again = await oidc.walk(http, stack.url("/_codehub/auth/open/echo?path=/"),
                                stop=lambda h: 'name="password"' in h.text)
    assert again[-1].status == 200 and again[-1].url.startswith(provider.issuer)


async def test_non_browser_requests_still_get_401(
        signin: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = signin
    await stack.add(ECHO_ID, owner=ALICE)
    async with client() as http:
        async with http.get(stack.url("/w/echo/x"), allow_redirects=False) as r:
            assert r.status == 401
        async with http.post(stack.url("/w/echo/x"), data=b"x", allow_redirects=False,
                             headers={"Accept": "text/html"}) as r:
            assert r.status == 401


@pytest.mark.parametrize("path", ["//evil.example/", "/\\evil.example", "https://evil/"])
async def test_open_refuses_paths_that_leave_the_site(
        signin: tuple[Stack, oidc.OidcProvider], path: str) -> None:
    stack, _ = signin
    async with client() as http, http.get(stack.url("/_codehub/auth/open/echo"),
                                          params={"path": path},
                                          allow_redirects=False) as r:
        assert r.status == 404


async def test_without_oidc_the_sign_in_routes_do_not_exist(stack: Stack) -> None:
    await stack.add()
    async with client() as http:
        for path in ("/_codehub/auth/open/echo", "/_codehub/auth/callback",
                     "/_codehub/auth/logout"):
            async with http.get(stack.url(path), allow_redirects=False) as r:
                assert r.status == 404, path
        async with http.get(stack.url("/w/echo/"), headers={"Accept": "text/html"},
                            allow_redirects=False) as r:
            assert r.status == 401


async def test_sign_in_works_in_host_mode(database_url: str, echo_upstream: Upstream,
                                          tmp_path: Path) -> None:
    async for stack, _ in signin_stack(database_url, echo_upstream, tmp_path, host_mode=True):
        await stack.add(ECHO_ID, owner=ALICE)
        origin = stack.gw.origins.workspace_origin(ECHO_ID)
        async with browser() as http:
            hops = await oidc.walk(http, origin + "/deep/path", user="alice",
                                   password=oidc.USERS["alice"])
        main = stack.cfg.server.public_url
        assert hops[0].location.startswith(main + "/_codehub/auth/open/echo?path=%2Fdeep")
        callback = next(h for h in hops if h.url.startswith(main + "/_codehub/auth/callback"))
        assert cookie_named(callback.set_cookie, SESSION)
        assert hops[-1].status == 200 and hops[-1].url == origin + "/deep/path"
        assert json.loads(hops[-1].text)["raw_path"] == "/deep/path"


@pytest.mark.parametrize(("changes", "words"), [
    ({"allowed_domains": ["example.test"]}, "email domain is not allowed"),
    ({"allowed_groups": ["codehub-admins"]}, "not in a group allowed"),
])
async def test_people_outside_the_allowed_groups_or_domains_are_refused(
        database_url: str, echo_upstream: Upstream, tmp_path: Path, changes: dict[str, Any],
        words: str) -> None:
    async for stack, _ in signin_stack(database_url, echo_upstream, tmp_path, **changes):
        await stack.add(ECHO_ID, owner=BOB)
        async with browser() as http:
            hops = await oidc.walk(http, stack.url("/w/echo/"), user="bob",
                                   password=oidc.USERS["bob"])
        assert hops[-1].status == 403 and words in hops[-1].text
        assert "not_allowed" in hops[-1].text
        assert not any(cookie_named(h.set_cookie, SESSION) for h in hops)
        async with browser() as http:  # alice is in both
            hops = await oidc.walk(http, stack.url("/w/echo/"), user="alice",
                                   password=oidc.USERS["alice"])
        assert hops[-1].status == 200


async def test_admins_may_be_named_one_by_one(database_url: str, echo_upstream: Upstream,
                                              tmp_path: Path) -> None:
    async for stack, _ in signin_stack(database_url, echo_upstream, tmp_path,
                                       admin_groups=[], admins=[BOB]):
        await stack.add(ECHO_ID, owner=ALICE)
        async with browser() as http:
            hops = await oidc.walk(http, stack.url("/w/echo/"), user="bob",
                                   password=oidc.USERS["bob"])
        assert hops[-1].status == 200
        async with browser() as http:  # alice is no admin now, but owns it
            hops = await oidc.walk(http, stack.url("/w/echo/"), user="alice",
                                   password=oidc.USERS["alice"])
        assert hops[-1].status == 200
