"""Signing in from a real browser (headless Debian chromium through Playwright) through the
real oidc-provider's login and consent forms, in host mode (each workspace at
http://{id}.ws.localhost:<port>/): the owner lands in the workspace, another person gets
the 403 page, logout ends both sessions. Screenshots go to test-artifacts/signin-*.png."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import playwright.async_api as playwright_api
import pytest
from gateway_support import ECHO_ID, Stack, Upstream
from harness import oidc
from signin_support import ALICE, signin_stack
from test_gateway_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS


@pytest.fixture
async def hosted_signin(database_url: str, echo_upstream: Upstream, tmp_path: Path,
                        ) -> AsyncIterator[Stack]:
    async for stack, _ in signin_stack(database_url, echo_upstream, tmp_path, host_mode=True,
                                       admin_groups=[]):
        await stack.add(ECHO_ID, owner=ALICE)
        yield stack


async def _sign_in(page: Any, user: str, shots: str = "") -> None:
    """Fill in the provider's own forms as a person would."""
    await page.wait_for_selector("#login")
    if shots:
        await page.screenshot(path=str(ARTIFACTS / f"{shots}-login.png"))
    await page.fill("#login", user)
    await page.fill("#password", oidc.USERS[user])
    await page.click("#sign-in")
    await page.wait_for_selector("#authorize")
    if shots:
        await page.screenshot(path=str(ARTIFACTS / f"{shots}-consent.png"))
    await page.click("#authorize")


async def test_a_person_signs_in_through_the_providers_forms_and_lands_in_the_workspace(
        hosted_signin: Stack) -> None:
    stack = hosted_signin
    ARTIFACTS.mkdir(exist_ok=True)
    origin = stack.gw.origins.workspace_origin(ECHO_ID)
    main = stack.cfg.server.public_url
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            alice = await browser.new_page(viewport={"width": 1000, "height": 720})
            await alice.goto(origin + "/projects/?tab=1")
            await _sign_in(alice, "alice", shots="signin")
            await alice.wait_for_url(origin + "/projects/?tab=1")
            echoed = json.loads(await alice.inner_text("body"))
            assert echoed["raw_path"] == "/projects/?tab=1"
            await alice.screenshot(path=str(ARTIFACTS / "signin-workspace.png"))
            cookies = {c["name"]: c for c in await alice.context.cookies()}
            assert cookies["codehub_session"]["httpOnly"] is True
            assert cookies["codehub_session"]["domain"] == "localhost"
            assert cookies["codehub_ws"]["domain"] == f"{ECHO_ID}.ws.localhost"

            bob = await (await browser.new_context()).new_page()
            await bob.goto(origin + "/")
            await _sign_in(bob, "bob")
            await bob.wait_for_selector("text=Not your workspace.")
            assert "bob@other.test" in await bob.inner_text("body")
            await bob.screenshot(path=str(ARTIFACTS / "signin-forbidden.png"))

            await alice.goto(main + "/_codehub/auth/logout")
            await alice.click("#sign-out")
            await alice.wait_for_url(main + "/_codehub/auth/signed-out")
            assert "Signed out." in await alice.inner_text("body")
            await alice.screenshot(path=str(ARTIFACTS / "signin-signed-out.png"))
            names = {c["name"] for c in await alice.context.cookies()}
            assert "codehub_session" not in names
            await alice.goto(main + "/_codehub/auth/open/echo?path=/")
            await alice.wait_for_selector("#login")  # the provider asks again
        finally:
            await browser.close()
