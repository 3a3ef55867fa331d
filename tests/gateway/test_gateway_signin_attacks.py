"""Attacks on signing in (codehub/gateway/signin.py, sessions.py, oidc.py), each against the
real oidc-provider (or, for tokens no real provider issues, the test issuer of
test_gateway_signin_tokens with an attacker's extras: attack_support.Forger) and the real
gateway. A test marked xfail(strict) with "HOLE:" shows an attack that works today.

The people: alice (the attacker unless said otherwise; no admin here) and bob (the victim).
A "workspace page" is HTML/JS a workspace serves: in path mode on the gateway's own origin
under /w/{id}/, in host mode on {id}.ws.localhost. What such a page makes the victim's
browser send is sent here with the headers Chromium adds (Sec-Fetch-*, Origin, Referer);
cookies it plants are put into the victim's cookie jar as `document.cookie` would."""

from __future__ import annotations

import asyncio
import html
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest
from attack_support import (
    EVIL,
    begin,
    cookie,
    follow,
    is_session_set,
    main,
    open_url,
    origin_of,
    ours,
    page_headers,
    plant,
    query,
    request_as_browser,
    resolve,
    scope,
    sign_in,
)
from gateway_support import ECHO_ID, Stack, Upstream, client
from harness import oidc
from signin_support import ALICE, BOB, CALLBACK, browser, signin_stack
from yarl import URL

from codehub.gateway import auth

OTHER_CLIENT = {"client_id": "other-app", "client_secret": "other-app-secret",
                "grant_types": ["authorization_code"], "response_types": ["code"],
                "token_endpoint_auth_method": "client_secret_basic",
                "redirect_uris": ["http://127.0.0.1:9/other-app/callback"]}


@pytest.fixture(params=["path", "host"])
async def mode(request: pytest.FixtureRequest, database_url: str, echo_upstream: Upstream,
               tmp_path: Path) -> AsyncIterator[tuple[Stack, oidc.OidcProvider]]:
    async for s, provider in signin_stack(database_url, echo_upstream, tmp_path,
                                          host_mode=request.param == "host", admin_groups=[],
                                          extra_clients=[OTHER_CLIENT]):
        assert provider is not None
        await s.add(ECHO_ID, owner=BOB)
        await s.add(EVIL, owner=ALICE)
        yield s, provider


@pytest.fixture
async def host_mode(database_url: str, echo_upstream: Upstream, tmp_path: Path,
                    ) -> AsyncIterator[tuple[Stack, oidc.OidcProvider]]:
    async for s, provider in signin_stack(database_url, echo_upstream, tmp_path,
                                          host_mode=True, admin_groups=[]):
        assert provider is not None
        await s.add(ECHO_ID, owner=BOB)
        await s.add(EVIL, owner=ALICE)
        yield s, provider


@pytest.fixture
async def path_mode(database_url: str, echo_upstream: Upstream, tmp_path: Path,
                    ) -> AsyncIterator[tuple[Stack, oidc.OidcProvider]]:
    async for s, provider in signin_stack(database_url, echo_upstream, tmp_path,
                                          admin_groups=[], extra_clients=[OTHER_CLIENT]):
        assert provider is not None
        await s.add(ECHO_ID, owner=BOB)
        await s.add(EVIL, owner=ALICE)
        yield s, provider


# --- open redirects -----------------------------------------------------------------------

OFF_SITE = ["//evil.example/", "/\\evil.example/", "https://evil.example/", "http:evil.example",
            "/\\/evil.example/", "/%2F/evil.example/", "/%5C%5Cevil.example/",
            "/\r\nLocation: http://evil.example/", "/%0d%0aLocation:%20http://evil.example/",
            "\t//evil.example/", "/ /evil.example/", "/./\\evil.example/"]
DOT_SEGMENTS = ["/.//evil.example/", "/..//evil.example/", "/%2e%2e//evil.example/",
                "/%2E//evil.example/", "/../..//evil.example/"]
async def _every_hop_stays_here(stack: Stack, path: str) -> None:
    own = ours(stack)
    async with browser() as http:
        await sign_in(http, stack, "bob")
        hops = await follow(http, open_url(stack, ECHO_ID, path), own)
    visited = [origin_of(u) for u, *_ in hops]
    assert set(visited) <= own, (f"{path!r} sent the browser to {hops[-1][0]} by "
                                 f"{[(st, loc[:80]) for _, st, loc, *_ in hops]}")


@pytest.mark.parametrize("path", OFF_SITE)
async def test_open_sends_a_browser_only_to_this_gateway_whatever_the_path(
        mode: tuple[Stack, oidc.OidcProvider], path: str) -> None:
    await _every_hop_stays_here(mode[0], path)


@pytest.mark.parametrize("path", DOT_SEGMENTS)
async def test_open_sends_a_browser_only_to_this_gateway_despite_dot_segments(
        mode: tuple[Stack, oidc.OidcProvider], path: str) -> None:
    await _every_hop_stays_here(mode[0], path)


async def test_a_workspace_origin_never_redirects_off_site(
        host_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = host_mode
    url = stack.gw.origins.workspace_origin(ECHO_ID) + "//evil.example/?access=x"
    async with browser() as http:
        status, location, *_ = await request_as_browser(
            http, url, {"Cookie": stack.cookie(ECHO_ID)})
    assert status == 303 or status >= 400
    if location:
        assert origin_of(resolve(url, location)) in ours(stack), location


# --- login CSRF and session fixation ------------------------------------------------------

async def test_the_attackers_callback_in_the_victims_browser_signs_nobody_in(
        path_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    """The attacker's code and state sent to the victim's browser (a link, an <img>): the
    victim's flow cookie, or none, does not match it."""
    stack, _ = path_mode
    async with browser() as attacker:
        callback, _ = await begin(attacker, stack, "alice")
    async with browser() as victim:
        status, _, text, cookies = await request_as_browser(victim, callback)
        assert status == 400 and not is_session_set(cookies, stack)
        await begin(victim, stack, "bob")  # the victim is half-way through a sign-in
        status, _, text, cookies = await request_as_browser(victim, callback)
        assert status == 400 and "state mismatch" in text
        assert not is_session_set(cookies, stack) and not cookie(victim, scope(stack).session)


async def test_the_attackers_code_with_the_victims_state_is_refused_by_pkce(
        path_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    """An attacker who learnt the victim's state (a Referer, a log) swaps in a code of
    their own: the code was issued for the attacker's PKCE challenge, not the victim's."""
    stack, _ = path_mode
    async with browser() as attacker:
        theirs, _ = await begin(attacker, stack, "alice")
    async with browser() as victim:
        _, authorize = await begin(victim, stack)  # stops at the provider's login
        forged = main(stack) + CALLBACK + "?" + urlencode(
            {"code": query(theirs, "code"), "state": query(authorize, "state"),
             "iss": query(theirs, "iss")})
        status, _, text, cookies = await request_as_browser(victim, forged)
    assert status == 403 and "code_refused" in text, text[:300]
    assert not is_session_set(cookies, stack)


async def test_the_victims_callback_in_the_attackers_browser_is_refused(
        path_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    """A stolen callback URL (the victim's code and state): the attacker's own flow cookie
    has another state, and with the state swapped the code fails PKCE."""
    stack, _ = path_mode
    async with browser() as victim:
        stolen, _ = await begin(victim, stack, "bob")
    async with browser() as attacker:
        _, authorize = await begin(attacker, stack)
        status, _, _, cookies = await request_as_browser(attacker, stolen)
        assert status == 400 and not is_session_set(cookies, stack)
        _, authorize = await begin(attacker, stack)
        swapped = stolen.replace("state=" + query(stolen, "state"),
                                 "state=" + query(authorize, "state"))
        status, _, text, cookies = await request_as_browser(attacker, swapped)
    assert status == 403 and not is_session_set(cookies, stack), text[:300]
    async with browser() as http:  # and the victim's code is spent for the victim too
        status, *_ = await request_as_browser(http, stolen)
        assert status == 400


@pytest.mark.xfail(strict=True, reason=(
    "HOLE (path mode): login CSRF by cookie planting. alice begins a sign-in and keeps her "
    "flow cookie and her callback URL (code+state); her page under /w/evil/ (same origin) "
    "sets document.cookie='codehub_signin=<hers>; path=/_codehub/auth/' and navigates to "
    "the callback URL: bob's browser is signed in as alice. Path= is no boundary within "
    "an origin (ARCHITECTURE); sign-in in path mode inherits that."))
async def test_a_flow_cookie_planted_by_a_workspace_page_does_not_sign_the_victim_in(
        path_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = path_mode
    async with browser() as attacker:
        callback, _ = await begin(attacker, stack, "alice")
        flow = cookie(attacker, scope(stack).flow)
    async with browser() as victim:
        plant(victim, stack, scope(stack).flow, flow)
        _, _, _, cookies = await request_as_browser(victim, callback)
    assert not is_session_set(cookies, stack), "bob's browser is now signed in as alice"


@pytest.mark.xfail(strict=True, reason=(
    "HOLE (path mode): login CSRF by planting the session itself. alice copies her own "
    "codehub_session value; her page under /w/evil/ sets document.cookie="
    "'codehub_session=<hers>; path=/_codehub/auth/': bob's browser is alice for "
    "session_ttl (open/evil hands it alice's workspace; open/echo says 'signed in as "
    "alice'), until bob logs out."))
async def test_a_session_planted_by_a_workspace_page_is_not_the_victims(
        path_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = path_mode
    async with browser() as attacker:
        await sign_in(attacker, stack, "alice", EVIL)
        theirs = cookie(attacker, scope(stack).session)
    async with browser() as victim:
        plant(victim, stack, scope(stack).session, theirs)
        _, location, *_ = await request_as_browser(victim, open_url(stack, EVIL))
    assert "access=" not in location, "bob's browser opens alice's workspace as alice"


async def test_a_session_is_made_fresh_at_each_sign_in_never_taken_from_the_browser(
        path_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    """Session fixation: a session value the browser held when the callback came (an
    attacker's planted one) is replaced by a new one naming who signed in."""
    stack, _ = path_mode
    assert stack.gw.signin is not None
    async with browser() as attacker:
        await sign_in(attacker, stack, "alice", EVIL)
        theirs = cookie(attacker, scope(stack).session)
    async with browser() as victim:
        callback, _ = await begin(victim, stack, "bob")
        plant(victim, stack, scope(stack).session, theirs)
        status, *_ = await request_as_browser(victim, callback)
        mine = cookie(victim, scope(stack).session)
    assert status == 303 and mine and mine != theirs
    who = stack.gw.signin.signer.check_session(mine)
    assert who is not None and who.person == BOB


# --- a workspace's own page against the sign-in --------------------------------------------

async def test_no_workspace_receives_or_sets_the_session_or_flow_cookie(
        mode: tuple[Stack, oidc.OidcProvider]) -> None:
    """The session and flow cookies are scoped away from every workspace (Path=
    /_codehub/auth/ on the main origin, host-only), and a workspace's Set-Cookie of any
    of CodeHub's cookie names never reaches the browser."""
    stack, _ = mode
    host_mode = stack.gw.origins.host_mode
    root = (stack.gw.origins.workspace_origin(ECHO_ID) if host_mode
            else main(stack) + "/w/echo")
    async with browser() as victim:
        hops = await sign_in(victim, stack, "bob")
        assert hops[-1].status == 200
        set_cookies = [c for h in hops for c in h.set_cookie
                       if c.startswith((scope(stack).session, scope(stack).flow))]
        assert len(set_cookies) >= 3  # flow set, session set, flow removed
        for c in set_cookies:
            assert "Path=/_codehub/auth/" in c and "Domain" not in c, c
        plant(victim, stack, scope(stack).flow, "a-flow-cookie-too")
        async with victim.get(root + "/probe") as r:
            assert r.status == 200
            sent = " ".join(v for k, v in (await r.json())["headers"] if k.lower() == "cookie")
        for name in auth.COOKIE_NAMES:
            assert name + "=" not in sent
        for name in sorted(auth.COOKIE_NAMES):
            set_cookie = f"{name}=planted; Path=/; Max-Age=3600"
            async with victim.get(root + "/_echo/headers", params={"Set-Cookie": set_cookie},
                                  allow_redirects=False) as r:
                assert r.status == 200
                assert not any(c.startswith(name + "=")
                               for c in r.headers.getall("Set-Cookie", []))


@pytest.mark.xfail(strict=True, reason=(
    "HOLE (path mode): a workspace page takes over its visitor's workspaces. alice signs in, "
    "GETs /_codehub/auth/open/evil and keeps (does not follow) the 303 to "
    "/w/evil/?access=T; bob opens that link (alice's own page then runs in bob's browser on "
    "the gateway's origin); the page fetches /_codehub/auth/open/echo?path=/notes.txt "
    "with credentials: bob's session (Path=/_codehub/auth/ matches) gets a 303 to "
    "/w/echo/?access=T2, redeemed for bob's workspace cookie, and the page reads bob's "
    "workspace (and may open its WebSocket: its Origin is the workspace's). Before sign-in "
    "the README's path-mode warning needed bob to have opened echo in that browser; now a "
    "session suffices. Fix: refuse [auth.oidc] without gateway.workspace_host (or refuse "
    "open for requests that are not top-level navigations and for Sec-Fetch-Site "
    "same-origin with a /w/ Referer, which still leaves iframes)."))
async def test_a_workspace_page_cannot_get_its_visitors_workspace_through_sign_in(
        path_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = path_mode
    async with browser() as attacker:
        await sign_in(attacker, stack, "alice", EVIL)  # gets a session (evil is not served)
        status, link, *_ = await request_as_browser(attacker, open_url(stack, EVIL))
        assert status == 303 and "access=" in link
    async with browser() as victim:
        await sign_in(victim, stack, "bob", EVIL)  # bob has a session (403 at evil: fine)
        status, *_ = await request_as_browser(victim, link)  # alice's page is now bob's
        assert status == 303 and cookie(victim, auth.COOKIE_NAME)
        hops = await follow(victim, open_url(stack, ECHO_ID, "/notes.txt"), ours(stack),
                            page_headers(stack, EVIL, same_origin=True))
    _, status, _, body, _ = hops[-1]
    assert not (status == 200 and '"/notes.txt"' in body), "alice's page reads bob's workspace"


async def test_a_sibling_origins_page_gets_nothing_readable_from_sign_in(
        host_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    """Host mode: the same fetch from evil's own origin is cross-origin: no answer of the
    chain carries an Access-Control-Allow-Origin, so the browser shows the page nothing;
    what is left is that bob's browser gets his own workspace cookie (harmless)."""
    stack, _ = host_mode
    headers = page_headers(stack, EVIL, same_origin=False)
    url, seen = open_url(stack, ECHO_ID, "/notes.txt"), []
    async with browser() as victim:
        await sign_in(victim, stack, "bob", EVIL)
        for _ in range(4):
            async with victim.get(URL(url, encoded=True), allow_redirects=False,
                                  headers=headers) as r:
                seen.append((url, r.status))
                assert "Access-Control-Allow-Origin" not in r.headers, url
                assert "Access-Control-Allow-Credentials" not in r.headers, url
                if r.status != 303:
                    break
                url = resolve(url, r.headers["Location"])
    assert seen[-1][1] == 200 and len(seen) == 3, seen  # open, link, workspace


async def test_open_gives_no_credential_for_another_persons_workspace(
        mode: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = mode
    async with browser() as attacker:
        await sign_in(attacker, stack, "alice", EVIL)
        hops = await follow(attacker, open_url(stack, ECHO_ID, "/"), ours(stack))
        assert hops[-1][1] == 403 and "Not your workspace." in hops[-1][3]
        assert not any("access=" in loc for _, _, loc, *_ in hops)
        assert not any(c.startswith(auth.COOKIE_NAME) or c.startswith(auth.HOST_COOKIE_NAME)
                       for *_, set_cookie in hops for c in set_cookie)


# --- callbacks replayed, codes of others -------------------------------------------------

async def test_a_code_is_redeemed_once_even_with_a_new_state(
        path_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = path_mode
    async with browser() as first:
        callback, _ = await begin(first, stack, "bob")
        status, *_ = await request_as_browser(first, callback)
        assert status == 303
    async with browser() as again:
        _, authorize = await begin(again, stack)
        replay = main(stack) + CALLBACK + "?" + urlencode(
            {"code": query(callback, "code"), "state": query(authorize, "state")})
        status, _, text, cookies = await request_as_browser(again, replay)
    assert status == 403 and "code_refused" in text and not is_session_set(cookies, stack)


async def test_one_callback_sent_twice_at_once_signs_in_once(
        path_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = path_mode
    async with browser() as http:
        callback, _ = await begin(http, stack, "bob")
        flow = f"{scope(stack).flow}={cookie(http, scope(stack).flow)}"
    async with client() as raw:
        answers = await asyncio.gather(*(request_as_browser(raw, callback, {"Cookie": flow})
                                         for _ in range(8)))
    made = [a for a in answers if is_session_set(a[3], stack)]
    assert len(made) == 1 and sorted(a[0] for a in answers) == [303] + [400] * 7


async def test_a_code_issued_to_another_client_is_refused(
        path_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    """The attacker runs another client of the same provider and gets the victim's (or
    their own) code for it, with the very PKCE challenge, nonce and state of a CodeHub
    sign-in: CodeHub redeems it as its own client, and the provider refuses."""
    stack, provider = path_mode
    async with browser() as victim:
        _, authorize = await begin(victim, stack)
        q = parse_qs(urlsplit(authorize).query)
        theirs = provider.issuer + "/auth?" + urlencode({
            "response_type": "code", "client_id": OTHER_CLIENT["client_id"],
            "redirect_uri": OTHER_CLIENT["redirect_uris"][0], "scope": q["scope"][0],  # type: ignore[index]
            "state": q["state"][0], "nonce": q["nonce"][0],
            "code_challenge": q["code_challenge"][0], "code_challenge_method": "S256"})
        async with browser() as attacker:
            hops = await oidc.walk(attacker, theirs, user="bob", password=oidc.USERS["bob"],
                                   stop=lambda h: "/other-app/callback" in h.location)
        code = query(hops[-1].location, "code")
        forged = main(stack) + CALLBACK + "?" + urlencode({"code": code,
                                                           "state": q["state"][0]})
        status, _, text, cookies = await request_as_browser(victim, forged)
    assert status == 403 and "code_refused" in text and not is_session_set(cookies, stack)


# --- logout -------------------------------------------------------------------------------

async def _signed_in(http: aiohttp.ClientSession, stack: Stack) -> None:
    hops = await sign_in(http, stack, "bob")
    assert hops[-1].status == 200 and cookie(http, scope(stack).session)


async def _session_still_opens(http: aiohttp.ClientSession, stack: Stack) -> bool:
    status, location, *_ = await request_as_browser(http, open_url(stack))
    return status == 303 and "access=" in location


CROSS_SITE = {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example",
              "Referer": "https://evil.example/"}


async def test_a_cross_site_post_to_logout_is_refused(
        path_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = path_mode
    async with browser() as victim:
        await _signed_in(victim, stack)
        status, _, text, cookies = await request_as_browser(
            victim, main(stack) + "/_codehub/auth/logout", CROSS_SITE, method="POST")
        assert status == 403 and "from CodeHub's own pages" in html.unescape(text)
        assert not cookies and await _session_still_opens(victim, stack)


async def test_a_cross_site_get_to_logout_does_not_end_the_session(
        path_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = path_mode
    async with browser() as victim:
        await _signed_in(victim, stack)
        await request_as_browser(victim, main(stack) + "/_codehub/auth/logout",
                                 {**CROSS_SITE, "Sec-Fetch-Mode": "navigate"})
        assert await _session_still_opens(victim, stack)


@pytest.mark.xfail(strict=True, reason=(
    "HOLE (README 'Not yet'): logout removes only the session cookie; the workspace cookie "
    "minted through the sign-in stays valid for auth.cookie_ttl (12 h), so after logout "
    "the same browser still opens the workspace: sign in, GET /w/echo/ (200), GET logout, "
    "GET /w/echo/ -> 200. Fix: logout bumps a per-person not-before that the workspace "
    "credential minted via sign-in also carries, or sign-in mints cookies no longer than "
    "the session and logout visits each workspace origin to clear them."))
async def test_after_logout_the_workspace_cookie_minted_at_sign_in_opens_nothing(
        mode: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = mode
    root = (stack.gw.origins.workspace_origin(ECHO_ID) + "/" if stack.gw.origins.host_mode
            else main(stack) + "/w/echo/")
    async with browser() as victim:
        await _signed_in(victim, stack)
        await oidc.walk(victim, main(stack) + "/_codehub/auth/logout")
        assert not await _session_still_opens(victim, stack)  # the session is gone
        status, *_ = await request_as_browser(victim, root, {"Accept": "application/json"})
    assert status in (401, 403), "the workspace still opens after logout"


async def test_a_session_value_copied_before_logout_is_refused_after_it(
        path_mode: tuple[Stack, oidc.OidcProvider]) -> None:
    stack, _ = path_mode
    async with browser() as victim:
        await _signed_in(victim, stack)
        copied = cookie(victim, scope(stack).session)
        await oidc.walk(victim, main(stack) + "/_codehub/auth/logout")
    async with client() as raw:
        _, location, *_ = await request_as_browser(
            raw, open_url(stack), {"Cookie": f"{scope(stack).session}={copied}"})
    assert "access=" not in location, "a logged-out session still mints access links"
