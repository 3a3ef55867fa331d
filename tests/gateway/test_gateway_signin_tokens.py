"""Bad ID tokens and bad callbacks are refused with a page, and nothing is created
(codehub/gateway/oidc.py, signin.py).

Tokens the real provider cannot be made to issue (a wrong audience or issuer, expired, a
bad signature, no nonce, an unpublished key id) come from `Issuer`: a tiny real HTTP
server of the test's own that publishes a discovery document, a key set and a token
endpoint, and signs with keys the test controls (joserfc). The gateway reaches it exactly
as it reaches a real provider, through the production code path. Replayed state and key
rotation use the real oidc-provider."""

from __future__ import annotations

import html
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from aiohttp import web
from gateway_support import ECHO_ID, Stack, Upstream, client
from harness import oidc, services
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey
from signin_support import ALICE, CALLBACK, browser, cookie_named, signin_stack

from codehub.gateway import auth

SESSION = auth.SESSION_COOKIE


class Issuer:
    """A test-controlled OpenID provider: `claims` and `header` shape the next ID token."""

    def __init__(self) -> None:
        self.key = oidc.new_signing_key()  # published in the key set
        self.other = oidc.new_signing_key()  # never published
        self.url = ""
        self.says_issuer = ""  # what the discovery document claims; "" for its own URL
        self.callback_iss = ""  # an `iss` parameter for the authorization response
        self.jwks_hits = 0
        self.discovery_hits = 0
        self.nonce = ""
        self.change: Callable[[dict[str, Any], dict[str, Any]], Any] = (
            lambda header, claims: self.key)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/authorize", self.authorize)
        app.router.add_post("/token", self.token)
        app.router.add_get("/jwks", self.jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def discovery(self, request: web.Request) -> web.Response:
        self.discovery_hits += 1
        return web.json_response({
            "issuer": self.says_issuer or self.url,
            "authorization_endpoint": self.url + "/authorize",
            "token_endpoint": self.url + "/token", "jwks_uri": self.url + "/jwks",
            "id_token_signing_alg_values_supported": ["RS256"]})

    async def authorize(self, request: web.Request) -> web.Response:
        q = request.query
        self.nonce = q["nonce"]
        answer = {"code": "test-code", "state": q["state"]}
        if self.callback_iss:
            answer["iss"] = self.callback_iss
        raise web.HTTPSeeOther(q["redirect_uri"] + "?" + urlencode(answer))

    async def token(self, request: web.Request) -> web.Response:
        now = int(time.time())
        header: dict[str, Any] = {"alg": "RS256", "kid": self.key.kid}
        claims: dict[str, Any] = {
            "iss": self.url, "aud": oidc.CLIENT_ID, "sub": "alice", "email": ALICE,
            "email_verified": True, "iat": now, "exp": now + 300, "nonce": self.nonce}
        key = self.change(header, claims)
        algorithms = [header["alg"]]
        return web.json_response({"id_token": jwt.encode(header, claims, key, algorithms),
                                  "access_token": "unused", "token_type": "Bearer"})

    async def jwks(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        return web.json_response({"keys": [self.key.as_dict(private=False)]})


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    it = Issuer()
    await it.start()
    try:
        yield it
    finally:
        await it.close()


@pytest.fixture
async def rogue(database_url: str, echo_upstream: Upstream, tmp_path: Path,
                issuer: Issuer) -> AsyncIterator[tuple[Stack, Issuer]]:
    async for s, _ in signin_stack(database_url, echo_upstream, tmp_path, issuer=issuer.url,
                                   scopes=["openid", "email"], jwks_refetch_interval=3600):
        await s.add(ECHO_ID, owner=ALICE)
        yield s, issuer


def _aud(h: dict[str, Any], c: dict[str, Any], it: Issuer) -> RSAKey:
    c["aud"] = "someone-else"
    return it.key


def _iss(h: dict[str, Any], c: dict[str, Any], it: Issuer) -> RSAKey:
    c["iss"] = "https://evil.example"
    return it.key


def _expired(h: dict[str, Any], c: dict[str, Any], it: Issuer) -> RSAKey:
    c["iat"], c["exp"] = c["iat"] - 7200, c["iat"] - 3600
    return it.key


def _bad_signature(h: dict[str, Any], c: dict[str, Any], it: Issuer) -> RSAKey:
    return it.other  # the published key's kid, another key's signature


def _no_nonce(h: dict[str, Any], c: dict[str, Any], it: Issuer) -> RSAKey:
    del c["nonce"]
    return it.key


def _wrong_nonce(h: dict[str, Any], c: dict[str, Any], it: Issuer) -> RSAKey:
    c["nonce"] = "another-sign-in"
    return it.key


def _unknown_kid(h: dict[str, Any], c: dict[str, Any], it: Issuer) -> RSAKey:
    h["kid"] = "not-published"
    return it.other


def _hmac_with_public_key(h: dict[str, Any], c: dict[str, Any], it: Issuer) -> Any:
    """The classic confusion: the provider's public key used as an HMAC secret."""
    h["alg"] = "HS256"
    return OctKey.import_key(str(it.key.as_dict(private=False)["n"]).encode())


async def _sign_in(stack: Stack) -> list[oidc.Hop]:
    async with browser() as http:
        hops = await oidc.walk(http, stack.url("/w/echo/"))
        # Nothing was created: the same browser is still sent to sign in.
        again = await oidc.walk(http, stack.url("/_codehub/auth/open/echo?path=/"),
                                stop=lambda h: h.status == 303 and "/authorize?" in h.location)
    assert "/authorize?" in again[-1].location
    return hops


async def test_a_good_token_of_the_test_issuer_signs_in(rogue: tuple[Stack, Issuer]) -> None:
    """The baseline the refusals below differ from by one thing each."""
    stack, _ = rogue
    async with browser() as http:
        hops = await oidc.walk(http, stack.url("/w/echo/"))
    assert hops[-1].status == 200 and hops[-1].url == stack.url("/w/echo/")


@pytest.mark.parametrize(("change", "reason", "words"), [
    (_aud, "wrong_audience", "'aud' claim is not valid"),
    (_iss, "wrong_issuer", "'iss' claim is not valid"),
    (_expired, "expired", "'exp' claim is not valid"),
    (_bad_signature, "bad_signature", "signature is not valid"),
    (_no_nonce, "missing_nonce", "has no 'nonce' claim"),
    (_wrong_nonce, "nonce_mismatch", "'nonce' claim is not valid"),
    (_unknown_kid, "unknown_key", "a key the identity provider does not publish"),
    (_hmac_with_public_key, "bad_algorithm", "not one the provider advertises"),
])
async def test_a_bad_id_token_is_refused_with_a_page_and_nothing_is_created(
        rogue: tuple[Stack, Issuer], change: Any, reason: str, words: str) -> None:
    stack, it = rogue
    it.change = lambda h, c: change(h, c, it)
    hops = await _sign_in(stack)
    callback = next(h for h in hops if h.url.startswith(stack.url(CALLBACK)))
    assert callback is hops[-1]
    assert callback.status == 403 and "Sign-in refused." in callback.text
    assert words in html.unescape(callback.text) and reason in callback.text
    assert not cookie_named(callback.set_cookie, SESSION)
    assert cookie_named(callback.set_cookie, auth.FLOW_COOKIE).startswith(
        f'{auth.FLOW_COOKIE}=""')
    assert not any("access=" in h.location for h in hops)


async def test_unknown_key_ids_fetch_the_key_set_again_at_most_once_per_interval(
        rogue: tuple[Stack, Issuer]) -> None:
    stack, it = rogue
    it.change = lambda h, c: _unknown_kid(h, c, it)
    for _ in range(3):
        hops = await _sign_in(stack)
        assert hops[-1].status == 403 and "unknown_key" in hops[-1].text
    assert it.jwks_hits == 1


async def test_a_replayed_state_is_refused(database_url: str, echo_upstream: Upstream,
                                           tmp_path: Path) -> None:
    async for stack, _ in signin_stack(database_url, echo_upstream, tmp_path):
        await stack.add(ECHO_ID, owner=ALICE)
        async with browser() as http:
            hops = await oidc.walk(http, stack.url("/w/echo/"), user="alice",
                                   password=oidc.USERS["alice"])
        flow = next(cookie_named(h.set_cookie, auth.FLOW_COOKIE) for h in hops
                    if cookie_named(h.set_cookie, auth.FLOW_COOKIE))
        callback = next(h for h in hops if h.url.startswith(stack.url(CALLBACK)))
        assert callback.status == 303
        async with client() as http, http.get(
                callback.url, headers={"Cookie": flow.split(";")[0], "Accept": "text/html"},
                allow_redirects=False) as r:
            text = await r.text()
            assert r.status == 400 and "already used (a replayed state)" in text
            assert SESSION not in r.headers.get("Set-Cookie", "").split("=")[0]


@pytest.mark.parametrize("case", ["no flow cookie", "another state", "provider error"])
async def test_a_callback_that_is_not_this_browsers_sign_in_is_refused(
        rogue: tuple[Stack, Issuer], case: str) -> None:
    stack, it = rogue
    async with browser() as http:
        hops = await oidc.walk(http, stack.url("/w/echo/"),
                               stop=lambda h: h.location.startswith(it.url + "/authorize"))
        query = {"code": "test-code", "state": "s" * 32}
        if case == "no flow cookie":
            http.cookie_jar.clear()
        elif case == "provider error":
            state = parse_qs(urlsplit(hops[-1].location).query)["state"][0]
            query = {"error": "access_denied", "state": state}
        done = await oidc.walk(http, stack.url(CALLBACK + "?" + urlencode(query)))
    last = done[-1]
    assert last.status == (403 if case == "provider error" else 400)
    assert "Sign-in" in last.text and not cookie_named(last.set_cookie, SESSION)


async def test_a_key_rotation_at_the_provider_is_followed(
        database_url: str, echo_upstream: Upstream, tmp_path: Path) -> None:
    """The provider restarts with a new key: the cached key set lacks its kid, the gateway
    fetches the set once more and the sign-in succeeds."""
    async for stack, provider in signin_stack(database_url, echo_upstream, tmp_path,
                                              jwks_refetch_interval=0):
        assert provider is not None and stack.gw.signin is not None
        await stack.add(ECHO_ID, owner=ALICE)
        rp = stack.gw.signin.client
        async with browser() as http:
            hops = await oidc.walk(http, stack.url("/w/echo/"), user="alice",
                                   password=oidc.USERS["alice"])
        assert hops[-1].status == 200 and rp.key_fetches == 1
        old_kid = provider.kid
        provider.rotate()
        assert provider.kid != old_kid
        async with browser() as http:
            hops = await oidc.walk(http, stack.url("/w/echo/"), user="alice",
                                   password=oidc.USERS["alice"])
        assert hops[-1].status == 200, hops[-1].text
        assert rp.key_fetches == 2


async def test_a_discovery_document_of_another_issuer_is_not_used(
        rogue: tuple[Stack, Issuer]) -> None:
    stack, it = rogue
    it.says_issuer = "https://evil.example"
    async with browser() as http:
        hops = await oidc.walk(http, stack.url("/w/echo/"))
    assert hops[-1].status == 502 and "Sign-in is unavailable." in hops[-1].text
    assert "another issuer" in hops[-1].text
    assert not any(h.location.startswith(it.url) for h in hops)


async def test_on_https_host_mode_the_cookies_are_secure_and_host_prefixed(
        database_url: str, echo_upstream: Upstream, tmp_path: Path, issuer: Issuer) -> None:
    """TLS ends at a proxy in front (the public URL is https); requests arrive plain."""
    async for stack, _ in signin_stack(database_url, echo_upstream, tmp_path, host_mode=True,
                                       https=True, issuer=issuer.url):
        await stack.add(ECHO_ID, owner=ALICE)
        async with client() as http:
            async with http.get(stack.url("/_codehub/auth/open/echo?path=/"),
                                allow_redirects=False) as r:
                assert r.status == 303
                flow = r.headers["Set-Cookie"]
                authorize = r.headers["Location"]
            assert flow.startswith("__Host-codehub_signin=")
            assert all(a in flow for a in ("Secure", "HttpOnly", "Path=/;", "SameSite=Lax"))
            assert parse_qs(urlsplit(authorize).query)["redirect_uri"] == [
                stack.cfg.server.public_url + CALLBACK]
            async with http.get(authorize, allow_redirects=False) as r:
                back = r.headers["Location"]
            async with http.get(stack.url(back[back.index(CALLBACK):]), allow_redirects=False,
                                headers={"Cookie": flow.split(";")[0]}) as r:
                assert r.status == 303, await r.text()
                cookies = r.headers.getall("Set-Cookie")
        session = cookie_named(cookies, "__Host-codehub_session")
        assert all(a in session for a in ("Secure", "HttpOnly", "Path=/;", "SameSite=Lax"))


async def test_an_authorization_response_of_another_issuer_is_refused(
        rogue: tuple[Stack, Issuer]) -> None:
    """RFC 9207's mix-up defence: the provider names itself in the answer."""
    stack, it = rogue
    it.callback_iss = "https://evil.example"
    hops = await _sign_in(stack)
    assert hops[-1].status == 403 and "another identity provider" in hops[-1].text
    assert not cookie_named(hops[-1].set_cookie, SESSION)
    it.callback_iss = it.url
    async with browser() as http:
        hops = await oidc.walk(http, stack.url("/w/echo/"))
    assert hops[-1].status == 200


async def test_discovery_and_key_set_are_fetched_once_for_many_sign_ins(
        rogue: tuple[Stack, Issuer]) -> None:
    stack, it = rogue
    for _ in range(3):
        async with browser() as http:
            hops = await oidc.walk(http, stack.url("/w/echo/"))
        assert hops[-1].status == 200
    assert (it.discovery_hits, it.jwks_hits) == (1, 1)


async def test_an_unreachable_provider_gives_a_page_not_a_crash(
        database_url: str, echo_upstream: Upstream, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{services.free_port()}"
    async for stack, _ in signin_stack(database_url, echo_upstream, tmp_path, issuer=closed,
                                       http_timeout=5):
        await stack.add(ECHO_ID, owner=ALICE)
        async with browser() as http:
            hops = await oidc.walk(http, stack.url("/w/echo/"))
        assert hops[-1].status == 502 and "Sign-in is unavailable." in hops[-1].text
        assert "could not be read" in hops[-1].text
