"""The self-service page in a real browser (headless Debian chromium through Playwright),
signed in through the real oidc-provider's forms, in host mode (each workspace at
http://{id}.ws.localhost:<port>/). The first test has no reconciler (what the buttons ask
for is checked in the database); the second runs a real one (Docker, moto S3) and watches
an archive and a restore on the page, through the loading page's event stream.
Screenshots go to test-artifacts/portal-*.png."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import playwright.async_api as playwright_api
import pytest
from gateway_support import ECHO_ID, Stack, Upstream
from harness import services
from reconciler_stack import make_stack
from signin_support import ALICE, BOB, signin_stack
from test_gateway_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from test_gateway_browser_signin import _sign_in

from codehub import audit
from codehub.model import DesiredState, Status

HOME = "/_codehub/auth/home"
# Records every data-operation a row of the page takes (the page changes a row only when
# its event stream says so).
WATCH_ROWS = """() => {
  window.seen = [];
  new MutationObserver(() => {
    document.querySelectorAll("#rows tr").forEach((tr) => {
      const s = tr.id + ":" + tr.dataset.status + ":" + tr.dataset.operation;
      if (window.seen[window.seen.length - 1] !== s) { window.seen.push(s); }
    });
  }).observe(document.getElementById("rows"), {childList: true, subtree: true});
}"""


@pytest.fixture
async def hosted_signin(database_url: str, echo_upstream: Upstream, tmp_path: Path,
                        ) -> AsyncIterator[Stack]:
    async for stack, _ in signin_stack(database_url, echo_upstream, tmp_path, host_mode=True):
        yield stack


async def _open_page(browser: Any, stack: Stack, user: str, shots: str = "") -> Any:
    page = await (await browser.new_context(viewport={"width": 1100, "height": 720})).new_page()
    main = stack.cfg.server.public_url
    await page.goto(main + "/")
    await _sign_in(page, user, shots=shots)
    await page.wait_for_url(main + HOME)
    await page.wait_for_selector("body[data-loaded]")
    return page


async def _actions(stack: Stack, person: str) -> list[tuple[str, str | None, int]]:
    rows = await audit.AuditLog(stack.store).page(before_id=None, limit=50,
                                                  actor="person:" + person)
    return [(e.action, e.workspace_id, e.status) for e in reversed(rows)]


async def test_a_person_signs_in_lands_on_the_page_opens_wakes_and_stops_workspaces(
        hosted_signin: Stack) -> None:
    stack = hosted_signin
    await stack.add(ECHO_ID, owner=BOB)  # RUNNING: the echo container
    await stack.add("nap", owner=BOB, status=Status.WARM)
    await stack.add("alices", owner=ALICE)
    ARTIFACTS.mkdir(exist_ok=True)
    main = stack.cfg.server.public_url
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            bob = await _open_page(browser, stack, "bob", shots="portal")
            assert await bob.inner_text("#person") == BOB
            assert await bob.locator("#rows tr").count() == 2  # his own only
            assert await bob.locator("#ws-alices").count() == 0
            assert not await bob.is_visible("#all-switch")  # not an admin
            await bob.screenshot(path=str(ARTIFACTS / "portal-list.png"), full_page=True)

            # The keyboard reaches the buttons; Enter on Open lands in the workspace.
            await bob.focus(f"#ws-{ECHO_ID} button:has-text('Open')")
            await bob.keyboard.press("Enter")
            origin = stack.gw.origins.workspace_origin(ECHO_ID)
            await bob.wait_for_url(origin + "/")
            assert json.loads(await bob.inner_text("body"))["raw_path"] == "/"

            await bob.goto(main + HOME)
            await bob.wait_for_selector("body[data-loaded]")
            await bob.click("#ws-nap button:has-text('Open')")  # WARM: woken, loading page
            await bob.wait_for_url(stack.gw.origins.workspace_origin("nap") + "/")
            await bob.wait_for_selector("text=Waking up your workspace")
            await bob.screenshot(path=str(ARTIFACTS / "portal-wake.png"))
            assert (await stack.store.get("nap")).desired_state is DesiredState.RUNNING  # type: ignore[union-attr]

            await bob.goto(main + HOME)
            await bob.wait_for_selector("body[data-loaded]")
            await bob.click(f"#ws-{ECHO_ID} button:has-text('Stop')")
            await bob.wait_for_selector(f"#ws-{ECHO_ID} >> text=Going to stopped")
            assert (await stack.store.get(ECHO_ID)).desired_state is DesiredState.WARM  # type: ignore[union-attr]
            await bob.screenshot(path=str(ARTIFACTS / "portal-stopping.png"), full_page=True)

            # The page's own call on another person's workspace: 403.
            status = await bob.evaluate("""() => fetch("self/workspaces/alices/stop", {
                method: "POST", headers: {"Content-Type": "application/json"},
                body: "{}"}).then((r) => r.status)""")
            assert status == 403
            assert (await stack.store.get("alices")).desired_state is DesiredState.RUNNING  # type: ignore[union-attr]

            await bob.click("text=Sign out")  # the page's own form, then the provider's
            await bob.click("#sign-out")
            await bob.wait_for_url(main + "/_codehub/auth/signed-out")
            await bob.goto(main + "/")
            await bob.wait_for_selector("#login")  # signed out: the provider asks again

            alice = await _open_page(browser, stack, "alice")
            assert await alice.locator("#rows tr").count() == 1
            await alice.check("#show-all")
            await alice.wait_for_selector(f"#ws-{ECHO_ID}")
            assert await alice.locator("#rows tr").count() == 3
            assert BOB in await alice.inner_text("#ws-nap")
            await alice.screenshot(path=str(ARTIFACTS / "portal-admin.png"), full_page=True)
        finally:
            await browser.close()
    assert await _actions(stack, BOB) == [
        ("self.open", ECHO_ID, 200), ("self.open", "nap", 200), ("self.stop", ECHO_ID, 202),
        ("self.stop", "alices", 403)]


async def test_archive_and_restore_progress_is_watched_live_on_the_page(
        hosted_signin: Stack, database_url: str, s3_settings: dict[str, str], docker_prefix: str,
        workspace_image: str, docker_engine: services.DockerEngine) -> None:
    stack = hosted_signin
    ARTIFACTS.mkdir(exist_ok=True)
    async with make_stack(database_url=database_url,
                          hints=stack.hints, s3_settings=s3_settings,
                          docker_url=docker_engine.url, image=workspace_image,
                          prefix=docker_prefix) as leader:
        await leader.store.create(id="arc", owner=BOB, image_ref=workspace_image)
        await stack.hints.publish("arc")
        leader.run_controller()
        await leader.wait_status("arc", Status.RUNNING, timeout=120)
        await leader.write_home("arc")
        # incompressible bytes: archiving lasts long enough for the page to see it
        await leader.exec("arc", 'import os; open("/home/coder/blob", "wb")'
                                 '.write(os.urandom(48 << 20))')
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                bob = await _open_page(browser, stack, "bob")
                await bob.evaluate(WATCH_ROWS)
                await bob.click("#ws-arc button:has-text('Archive')")
                await bob.wait_for_selector('#ws-arc[data-status="COLD"]'
                                            '[data-operation="NONE"]', timeout=180_000)
                await bob.wait_for_selector("#ws-arc button:has-text('Restore')")
                assert re.search(r"\d [KM]iB", await bob.inner_text("#ws-arc"))  # its size
                await bob.screenshot(path=str(ARTIFACTS / "portal-archived.png"),
                                     full_page=True)
                await bob.click("#ws-arc button:has-text('Restore')")
                await bob.wait_for_selector('#ws-arc[data-status="WARM"]'
                                            '[data-operation="NONE"]', timeout=180_000)
                await bob.screenshot(path=str(ARTIFACTS / "portal-restored.png"),
                                     full_page=True)
                seen = await bob.evaluate("() => window.seen")
            finally:
                await browser.close()
        await leader.wait_status("arc", Status.WARM, timeout=60)
    # Seen live, in order (a state too short-lived to be read may be skipped, never these).
    archiving, restoring = seen.index("ws-arc:WARM:ARCHIVING"), seen.index("ws-arc:COLD:RESTORING")
    assert seen[0] == "ws-arc:RUNNING:NONE" and archiving < restoring, seen
    assert seen[-1] == "ws-arc:WARM:NONE", seen
    assert await _actions(stack, BOB) == [("self.archive", "arc", 202),
                                          ("self.restore", "arc", 202)]
