"""Two sign-in attacks of test_gateway_signin_attacks.py replayed in a real browser
(headless Debian chromium through Playwright), so that what a browser does with the
gateway's answers is the browser's word, not attack_support.resolve's: host mode, the real
oidc-provider and its own forms. The attacker's site http://evil.example/ is a loopback
server of the test's own that chromium reaches through --host-resolver-rules (no network);
it records what it was asked. Both are HOLEs today (xfail strict)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import playwright.async_api as playwright_api
import pytest
from aiohttp import web
from gateway_support import ECHO_ID, Stack, Upstream
from harness import oidc
from signin_support import BOB, signin_stack
from test_gateway_browser import CHROMIUM, CHROMIUM_ARGS

EVIL_SITE = "http://evil.example/"


class EvilSite:
    """http://evil.example/ on loopback: answers `page` to every GET, records the paths."""

    def __init__(self) -> None:
        self.page = "<title>evil</title>evil"
        self.paths: list[str] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path_qs)
        return web.Response(text=self.page, content_type="text/html")


@pytest.fixture
async def evil_site() -> AsyncIterator[EvilSite]:
    site = EvilSite()
    app = web.Application()
    app.router.add_get("/{tail:.*}", site.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    site.port = runner.addresses[0][1]
    try:
        yield site
    finally:
        await runner.cleanup()


def _args(site: EvilSite) -> list[str]:
    return [*CHROMIUM_ARGS, f"--host-resolver-rules=MAP evil.example 127.0.0.1:{site.port}"]


@pytest.fixture
async def hosted_signin(database_url: str, echo_upstream: Upstream, tmp_path: Path,
                        ) -> AsyncIterator[Stack]:
    async for stack, _ in signin_stack(database_url, echo_upstream, tmp_path, host_mode=True,
                                       admin_groups=[]):
        await stack.add(ECHO_ID, owner=BOB)
        yield stack


async def _bob_signed_in(stack: Stack, browser: Any) -> Any:
    """A page of bob's, signed in and in his workspace."""
    page = await (await browser.new_context()).new_page()
    origin = stack.gw.origins.workspace_origin(ECHO_ID)
    await page.goto(origin + "/")
    await page.wait_for_selector("#login")
    await page.fill("#login", "bob")
    await page.fill("#password", oidc.USERS["bob"])
    await page.click("#sign-in")
    await page.wait_for_selector("#authorize")
    await page.click("#authorize")
    await page.wait_for_url(origin + "/")
    return page


async def test_a_link_to_open_never_lands_a_browser_off_site(
        hosted_signin: Stack, evil_site: EvilSite) -> None:
    stack = hosted_signin
    link = stack.cfg.server.public_url + f"/_codehub/auth/open/{ECHO_ID}?" + urlencode(
        {"path": "/.//evil.example/"})
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=_args(evil_site))
        try:
            page = await _bob_signed_in(stack, browser)
            await page.goto(link)
            landed = page.url
        finally:
            await browser.close()
    assert urlsplit(landed).hostname != "evil.example" and not evil_site.paths, landed


async def test_another_site_cannot_sign_a_person_out(
        hosted_signin: Stack, evil_site: EvilSite) -> None:
    stack = hosted_signin
    main = stack.cfg.server.public_url
    evil_site.page = f'<script>location = "{main}/_codehub/auth/logout";</script>'
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=_args(evil_site))
        try:
            page = await _bob_signed_in(stack, browser)
            names = {c["name"] for c in await page.context.cookies()}
            assert "codehub_session" in names
            await page.goto(EVIL_SITE)
            await page.wait_for_url(main + "/_codehub/auth/logout")  # CodeHub's refusal
            assert "Refused" in await page.content()
            names = {c["name"] for c in await page.context.cookies()}
        finally:
            await browser.close()
    assert evil_site.paths == ["/"]  # the attack page was loaded
    assert "codehub_session" in names, "evil.example signed bob out of CodeHub"
