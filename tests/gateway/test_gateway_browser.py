"""The pages in a real browser (headless Debian chromium through Playwright): auto-wake
from an access link, and the COLD and error pages. Screenshots go to test-artifacts/."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiodocker
import playwright.async_api as playwright_api
from gateway_support import ADMIN_TOKEN, Stack, client, controller, wait_for

from codehub.backends.docker.containers import DockerInstanceController
from codehub.backends.docker.volumes import DockerVolumeStorage
from codehub.backends.objects import LocalObjectStore
from codehub.clock import SystemClock
from codehub.model import DesiredState, Operation, Status
from codehub.reconciler.controller import Controller, Schedule
from codehub.reconciler.reconciler import Policy, Reconciler

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

# Counts the EventSource objects a page creates: the loading page must open exactly one.
COUNT_EVENT_SOURCES = """
(() => {
  const Original = window.EventSource;
  window.__eventSources = 0;
  window.EventSource = function (...args) {
    window.__eventSources += 1;
    return new Original(...args);
  };
  window.EventSource.prototype = Original.prototype;
  window.EventSource.CLOSED = Original.CLOSED;
})();
"""

# The same count kept in sessionStorage, so that it survives the loading page's reload,
# next to the number of documents loaded in this tab.
COUNT_ACROSS_RELOADS = """
(() => {
  const bump = (key) => sessionStorage.setItem(key, Number(sessionStorage.getItem(key) || 0) + 1);
  bump('__loads');
  const Original = window.EventSource;
  window.EventSource = function (...args) {
    bump('__eventSources');
    return new Original(...args);
  };
  window.EventSource.prototype = Original.prototype;
  window.EventSource.CLOSED = Original.CLOSED;
})();
"""


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[object]:
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 720})
            yield page
        finally:
            await browser.close()


class SlowStart:
    """The real DockerInstanceController, its start delayed 1.5 s so the loading page can be
    seen and photographed (JupyterHub's SlowSpawner)."""

    def __init__(self, real: DockerInstanceController) -> None:
        self.real = real

    async def start(self, workspace_id: str, image_ref: str, volume_name: str) -> None:
        await asyncio.sleep(1.5)
        await self.real.start(workspace_id, image_ref, volume_name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@contextlib.asynccontextmanager
async def real_reconciler(stack: Stack, tmp_path: Path, *, ttl_sweep_interval: float = 3600,
                          ) -> AsyncIterator[None]:
    """The real reconciler (Controller + Reconciler + Docker volumes + local archives),
    sharing the gateway's store and hint bus, as `codehub serve` wires them; its TTL sweep
    runs every `ttl_sweep_interval` seconds."""
    docker = aiodocker.Docker(url=stack.up.docker_url)
    instances = controller(stack.up, docker)
    objects = LocalObjectStore(tmp_path / "objects")
    await objects.open()
    storage = DockerVolumeStorage(docker=docker, objects=objects, helper_image=stack.up.image,
                                  volume_prefix=f"{stack.up.prefix}-home-")
    slow = SlowStart(instances)
    reconciler = Reconciler(store=stack.store, instances=slow,  # type: ignore[arg-type]
                            storage=storage, clock=SystemClock(), policy=Policy(),
                            on_change=stack.hints.publish)
    ctl = Controller(reconciler=reconciler, store=stack.store, hints=stack.hints,
                     instances=instances, storage=storage, objects=None, clock=SystemClock(),
                     schedule=Schedule(workers=2, resync_interval=1,
                                       ttl_sweep_interval=ttl_sweep_interval))
    # No orphan sweep here: this module's shared echo container has no row in this test's
    # database, and the sweep would rightly remove it.
    ctl.remove_orphans = _no_orphans  # type: ignore[method-assign]
    task = asyncio.create_task(ctl.lead())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await instances.close()
        await objects.close()
        await docker.close()


async def _no_orphans() -> list[str]:
    return []


async def mint(stack: Stack, workspace_id: str) -> str:
    async with client() as http, http.post(
            stack.url(f"/api/v1/workspaces/{workspace_id}/access-links"),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        assert resp.status == 201
        url: str = (await resp.json())["url"]
        return url


async def test_access_link_to_a_warm_workspace_wakes_it_and_lands_on_the_ide(
        stack: Stack, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    async with real_reconciler(stack, tmp_path):
        # a real WARM workspace: provisioned by the reconciler, no container
        await stack.store.create(id="wake", owner="tester", image_ref=stack.up.image,
                                 desired_state=DesiredState.WARM)
        await stack.hints.publish("wake")
        await wait_for(lambda: _is_warm(stack, "wake"), timeout=60)
        link = await mint(stack, "wake")
        async with browser_page() as page:
            await page.add_init_script(COUNT_ACROSS_RELOADS)  # type: ignore[attr-defined]
            response = await page.goto(link)  # type: ignore[attr-defined]
            assert response.status == 200
            assert "/w/wake/" in page.url and "access=" not in page.url  # type: ignore[attr-defined]
            await page.wait_for_selector("#status-text")  # type: ignore[attr-defined]
            assert await page.title() == "Starting wake · CodeHub"  # type: ignore[attr-defined]
            await page.wait_for_function(  # type: ignore[attr-defined]
                "document.getElementById('transport').textContent === 'live'")
            await page.screenshot(path=str(ARTIFACTS / "loading.png"))  # type: ignore[attr-defined]
            # Requested RUNNING and hinted by the gateway itself.
            row = await stack.store.get("wake")
            assert row is not None and row.desired_state is DesiredState.RUNNING
            # The page reloads onto the workspace once it runs and answers.
            await page.wait_for_function(  # type: ignore[attr-defined]
                "document.body && document.body.innerText.includes('\"method\"')",
                timeout=60_000)
            body = await page.inner_text("body")  # type: ignore[attr-defined]
            assert '"path":"/"' in body.replace(" ", "")
            row = await stack.store.get("wake")
            assert row is not None and row.status is Status.RUNNING
            # Two documents (the loading page, then the IDE after its one reload) and one
            # EventSource over both, opened by the loading page (the echo page opens none).
            counts = await page.evaluate(  # type: ignore[attr-defined]
                "[sessionStorage.getItem('__loads'), sessionStorage.getItem('__eventSources')]")
            assert counts == ["2", "1"], counts


async def _is_warm(stack: Stack, wid: str) -> bool:
    row = await stack.store.get(wid)
    return row is not None and row.status is Status.WARM and row.operation is Operation.NONE


async def test_loading_page_opens_exactly_one_event_source(stack: Stack) -> None:
    await stack.add("sleepy", status=Status.WARM, desired=DesiredState.RUNNING)
    link = await mint(stack, "sleepy")
    async with browser_page() as page:
        await page.add_init_script(COUNT_EVENT_SOURCES)  # type: ignore[attr-defined]
        await page.goto(link)  # type: ignore[attr-defined]
        await page.wait_for_function(  # type: ignore[attr-defined]
            "document.getElementById('transport').textContent === 'live'")
        await asyncio.sleep(1.5)  # several poll intervals of the stream
        assert await page.evaluate("window.__eventSources") == 1  # type: ignore[attr-defined]


async def test_loading_page_shows_the_error_when_the_workspace_fails(stack: Stack) -> None:
    await stack.add("doomed", status=Status.WARM, desired=DesiredState.RUNNING)
    link = await mint(stack, "doomed")
    async with browser_page() as page:
        await page.goto(link)  # type: ignore[attr-defined]
        await page.wait_for_function(  # type: ignore[attr-defined]
            "document.getElementById('transport').textContent === 'live'")
        await stack.store.compare_and_set("doomed", expect_status=Status.WARM,
                                          expect_operation=Operation.NONE, status=Status.ERROR,
                                          error_message="image codehub/missing:1 not found",
                                          error_count=3)
        await stack.hints.publish("doomed")
        alert = page.locator("#failure")  # type: ignore[attr-defined]
        await alert.wait_for(state="visible", timeout=10_000)
        assert "image codehub/missing:1 not found" in await alert.inner_text()


async def test_cold_and_error_pages_render_and_are_saved_as_screenshots(stack: Stack) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await stack.add("archived", status=Status.COLD, desired=DesiredState.COLD,
                    archive_key="archived/home.tar.gz", archive_size=734003200,
                    archive_sha256="0" * 64, archive_created_at=datetime.now(UTC))
    await stack.add("broken", status=Status.ERROR, desired=DesiredState.RUNNING,
                    error_message="container exited with code 1:\nError: EACCES /home/coder",
                    error_count=8)
    async with browser_page() as page:
        response = await page.goto(await mint(stack, "archived"))  # type: ignore[attr-defined]
        assert response.status == 502
        assert "archived" in (await page.inner_text("h1"))  # type: ignore[attr-defined]
        await page.screenshot(path=str(ARTIFACTS / "cold.png"))  # type: ignore[attr-defined]
        response = await page.goto(await mint(stack, "broken"))  # type: ignore[attr-defined]
        assert response.status == 502
        assert "EACCES" in await page.inner_text("pre.detail")  # type: ignore[attr-defined]
        await page.screenshot(path=str(ARTIFACTS / "error.png"))  # type: ignore[attr-defined]
        response = await page.goto(stack.url("/w/nobody/"))  # type: ignore[attr-defined]
        assert response.status == 401
        await page.screenshot(path=str(ARTIFACTS / "unauthorized.png"))  # type: ignore[attr-defined]
