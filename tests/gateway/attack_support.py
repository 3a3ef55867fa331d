"""An attacker's tools for tests/gateway/test_gateway_signin_attacks.py.

- ``resolve(base, location)``: where a browser goes for a `Location` header, by the WHATWG
  URL rules that matter for open redirects: for http(s), any run of two or more slashes
  or backslashes starts an authority ("////evil" is http://evil/), backslashes are
  slashes, tabs and newlines are dropped, and "." / ".." segments, "%2e" spellings
  included, are removed. Python's urljoin and yarl follow RFC 3986, which differs there.
- ``request_as_browser``: sends a URL exactly as resolved (no client-side normalising).
- ``Forger``: the test issuer of test_gateway_signin_tokens (a real HTTP server with a
  discovery document, key set and token endpoint) that can also hand out a raw token the
  attacker built byte by byte (``forge``), counts token-endpoint hits, and serves an
  attacker's key set at ``/evil-jwks`` whose fetches it counts (a `jku`/`x5u` target).
- ``compact``: a JWS built by hand, for tokens joserfc refuses to make (``alg: none``, an
  HMAC keyed with a PEM public key). Attack tooling only: nothing here verifies anything.
- A browser's moves: ``sign_in`` (the whole dance), ``begin`` (up to the provider's answer,
  not sent), ``follow`` (redirects as a browser follows them), ``plant`` (what a page's
  `document.cookie` does), ``page_headers`` (what Chromium adds to a page's fetch).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
from aiohttp import web
from gateway_support import ECHO_ID, Stack
from harness import oidc
from signin_support import CALLBACK
from test_gateway_signin_tokens import Issuer
from yarl import URL

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", re.S)
_DOT = {".", "%2e"}
_DOTDOT = {"..", ".%2e", "%2e.", "%2e%2e"}


def _dedot(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        low = seg.lower()
        last = i == len(segments) - 1
        if low in _DOTDOT:
            if out:
                out.pop()
            if last:
                out.append("")
        elif low in _DOT:
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def resolve(base: str, location: str) -> str:
    """The absolute URL a browser at `base` goes to for `location` (http(s) only)."""
    loc = re.sub(r"[\t\n\r]", "", location).strip(" \x00")
    loc = loc.replace("\\", "/")
    b = URL(base, encoded=True)
    m = _SCHEME.match(loc)
    if m and m.group(1).lower() in ("http", "https"):
        rest = m.group(2)
        if m.group(1).lower() == b.scheme and not rest.startswith("/"):
            loc = rest  # "http:evil" on an http page is a relative path
        else:
            loc = "//" + rest.lstrip("/")
            return _absolute(m.group(1).lower(), loc[2:])
    if loc.startswith("//"):
        return _absolute(b.scheme, loc.lstrip("/"))
    origin = f"{b.scheme}://{b.raw_authority}"
    if loc.startswith("/"):
        target = loc
    elif loc.startswith("?"):
        target = b.raw_path + loc
    else:
        target = b.raw_path.rpartition("/")[0] + "/" + loc
    path, q, query = target.partition("?")
    return origin + _dedot(path) + (q + query if q else "")


def _absolute(scheme: str, rest: str) -> str:
    authority, _, tail = rest.partition("/")
    path, q, query = ("/" + tail).partition("?")
    return f"{scheme}://{authority}" + _dedot(path) + (q + query if q else "")


def origin_of(url: str) -> str:
    u = URL(url, encoded=True)
    return f"{u.scheme}://{u.raw_authority}".lower()


async def request_as_browser(http: aiohttp.ClientSession, url: str,
                             headers: dict[str, str] | None = None,
                             method: str = "GET") -> tuple[int, str, str, list[str]]:
    """(status, Location, body, Set-Cookie headers) of one request sent exactly to `url`."""
    async with http.request(method, URL(url, encoded=True), allow_redirects=False,
                            headers={"Accept": "text/html", **(headers or {})}) as r:
        return (r.status, r.headers.get("Location", ""), await r.text(errors="replace"),
                r.headers.getall("Set-Cookie", []))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def compact(header: dict[str, Any], claims: dict[str, Any],
            sign: Callable[[bytes], bytes]) -> str:
    signing_input = (_b64(json.dumps(header).encode()) + "." +
                     _b64(json.dumps(claims).encode())).encode("ascii")
    return signing_input.decode("ascii") + "." + _b64(sign(signing_input))


class Forger(Issuer):
    """`forge(header, claims) -> str`: the ID token the token endpoint answers with,
    given the claims a good one would carry; None: Issuer's own token."""

    def __init__(self) -> None:
        super().__init__()
        self.evil = oidc.new_signing_key()  # the attacker's key, in /evil-jwks only
        self.forge: Callable[[dict[str, Any], dict[str, Any]], str] | None = None
        self.token_hits = 0
        self.evil_hits = 0

    async def start(self) -> None:
        await super().start()
        assert self._runner is not None
        # The app is frozen once started: the attacker's key set is a second server.
        evil = web.Application()
        evil.router.add_get("/evil-jwks", self.evil_jwks)
        self._evil_runner = web.AppRunner(evil, access_log=None)
        await self._evil_runner.setup()
        site = web.TCPSite(self._evil_runner, "127.0.0.1", 0)
        await site.start()
        self.evil_url = f"http://127.0.0.1:{self._evil_runner.addresses[0][1]}/evil-jwks"

    async def close(self) -> None:
        await self._evil_runner.cleanup()
        await super().close()

    async def evil_jwks(self, request: web.Request) -> web.Response:
        self.evil_hits += 1
        return web.json_response({"keys": [self.evil.as_dict(private=False)]})

    async def token(self, request: web.Request) -> web.Response:
        self.token_hits += 1
        if self.forge is None:
            return await super().token(request)
        good = json.loads((await super().token(request)).text)["id_token"]
        header, claims = (json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
                          for p in good.split(".")[:2])
        return web.json_response({"id_token": self.forge(header, claims),
                                  "access_token": "unused", "token_type": "Bearer"})


# --- a browser's moves -------------------------------------------------------------------

EVIL = "evil"  # alice's workspace in the attack tests: the one whose pages attack
Hops = list[tuple[str, int, str, str, list[str]]]


def main(stack: Stack) -> str:
    return stack.cfg.server.public_url


def open_url(stack: Stack, wid: str = ECHO_ID, path: str = "/") -> str:
    return main(stack) + f"/_codehub/auth/open/{wid}?" + urlencode({"path": path})


def cookie(http: aiohttp.ClientSession, name: str) -> str:
    return next((c.value for c in http.cookie_jar if c.key == name), "")


def scope(stack: Stack) -> Any:
    assert stack.gw.signin is not None
    return stack.gw.signin.scope


def query(url: str, name: str) -> str:
    return parse_qs(urlsplit(url).query)[name][0]


async def sign_in(http: aiohttp.ClientSession, stack: Stack, user: str,
                  wid: str = ECHO_ID) -> list[oidc.Hop]:
    return await oidc.walk(http, open_url(stack, wid), user=user, password=oidc.USERS[user])


async def begin(http: aiohttp.ClientSession, stack: Stack, user: str = "",
                wid: str = ECHO_ID) -> tuple[str, str]:
    """A sign-in as `user` up to the provider's answer, not sent: (callback URL, the
    authorization URL the gateway made). No `user`: up to the provider's login form
    (callback URL "")."""
    cb = main(stack) + CALLBACK
    hops = await oidc.walk(http, open_url(stack, wid), user=user,
                           password=oidc.USERS.get(user, ""),
                           stop=lambda h: h.location.startswith(cb) or (
                               not user and 'name="password"' in h.text))
    assert not user or hops[-1].location.startswith(cb), hops[-1].text[:300]
    authorize = next(h.location for h in hops if "code_challenge=" in h.location)
    return hops[-1].location, authorize


async def follow(http: aiohttp.ClientSession, url: str, allowed: set[str],
                 headers: dict[str, str] | None = None, limit: int = 8) -> Hops:
    """Redirects followed as a browser follows them (attack_support.resolve), up to the
    first URL whose origin is not in `allowed` (recorded with status 0, not requested)."""
    hops: Hops = []
    for _ in range(limit):
        status, location, body, set_cookie = await request_as_browser(http, url, headers)
        hops.append((url, status, location, body, set_cookie))
        if not (300 <= status < 400 and location):
            return hops
        url = resolve(url, location)
        if origin_of(url) not in allowed:
            hops.append((url, 0, "", "", []))
            return hops
    return hops


def ours(stack: Stack) -> set[str]:
    """The origins of this gateway: the main one and, in host mode, the workspaces'."""
    own = {origin_of(main(stack))}
    if stack.gw.origins.host_mode:
        own |= {origin_of(stack.gw.origins.workspace_origin(w)) for w in (ECHO_ID, EVIL)}
    return own


def is_session_set(set_cookies: list[str], stack: Stack) -> bool:
    name = scope(stack).session + "="
    return any(c.startswith(name) and not c.startswith(name + '""') for c in set_cookies)


def plant(http: aiohttp.ClientSession, stack: Stack, name: str, value: str) -> None:
    """What `document.cookie = "<name>=<value>; path=/_codehub/auth/"` does in a page of
    /w/evil/ (path mode: the same host)."""
    morsel = SimpleCookie()
    morsel[name] = value
    morsel[name]["path"] = "/_codehub/auth/"
    http.cookie_jar.update_cookies(morsel, URL(main(stack) + "/w/evil/"))


def page_headers(stack: Stack, wid: str, *, same_origin: bool) -> dict[str, str]:
    """What Chromium sends for `fetch(url, {credentials: "include"})` from a page of `wid`."""
    page = (main(stack) + f"/w/{wid}/" if same_origin
            else stack.gw.origins.workspace_origin(wid) + "/")
    headers = {"Accept": "*/*", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty",
               "Referer": page, "Sec-Fetch-Site": "same-origin" if same_origin else "same-site"}
    if not same_origin:
        headers["Origin"] = origin_of(page)
    return headers
