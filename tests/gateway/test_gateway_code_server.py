"""Real code-server (VS Code in the browser) behind the gateway, in headless chromium: under
/w/{id}/ (path mode), and at a workspace origin of its own (host mode, {id}.ws.localhost,
which chromium resolves to loopback), woken from WARM by its access link.

The image is built by scripts/build-code-server-image (code-server from npm, cached in
build/ and as a Docker tag: a second run takes about a second). When it cannot be built on
this machine (no npm registry, no node) the test is skipped with the build's reason.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from gateway_support import Stack, start_workspace_container, wait_for
from test_gateway_browser import ARTIFACTS, browser_page, mint, real_reconciler

from codehub.model import DesiredState, Operation, Status

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def code_server_image(docker_engine: object) -> str:
    proc = subprocess.run([str(ROOT / "scripts" / "build-code-server-image")],
                          capture_output=True, text=True, timeout=2400, check=False)
    if proc.returncode != 0:
        # scripts/test installs what the build needs: a failed build is a failure, not a skip
        pytest.fail(f"code-server image could not be built: {proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


def watch_sockets(page: object) -> tuple[list[object], list[int]]:
    """The page's WebSockets as they open, and the sizes of the frames they receive."""
    sockets: list[object] = []
    frames: list[int] = []

    def on_socket(ws: object) -> None:
        sockets.append(ws)
        ws.on("framereceived", lambda payload: frames.append(len(payload)))  # type: ignore[attr-defined]

    page.on("websocket", on_socket)  # type: ignore[attr-defined]
    return sockets, frames


@pytest.mark.timeout(2400)
async def test_code_server_workbench_loads_and_its_websocket_connects(
        stack: Stack, code_server_image: str) -> None:
    await start_workspace_container(stack.up, "cs", image=code_server_image)
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    await stack.add("cs", status=Status.RUNNING, desired=DesiredState.RUNNING, now=long_ago)
    link = await mint(stack, "cs")
    async with browser_page() as page:
        sockets, frames = watch_sockets(page)
        response = await page.goto(link, timeout=60_000)  # type: ignore[attr-defined]
        assert response.status == 200
        await page.wait_for_selector(".monaco-workbench", timeout=90_000)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 60
        while not frames and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        ARTIFACTS.mkdir(exist_ok=True)
        await asyncio.sleep(2)  # let the workbench paint its parts for the screenshot
        await page.screenshot(path=str(ARTIFACTS / "code-server.png"))  # type: ignore[attr-defined]
        urls = [ws.url for ws in sockets]  # type: ignore[attr-defined]
        assert any("/w/cs/" in u for u in urls), urls
        assert frames, "the workbench's WebSocket received nothing"
        # No "cannot reconnect" dialog: the remote connection is up.
        text = await page.inner_text("body")  # type: ignore[attr-defined]
        assert "Cannot reconnect" not in text
        # The workbench's socket is relayed (counted open) and its traffic marks the
        # workspace active: the mark reaches the row with the next flush.
        assert stack.gw.activity.sockets.get("cs", 0) >= 1, stack.gw.activity.sockets

        async def marked() -> bool:
            row = await stack.store.get("cs")
            return row is not None and row.last_access_at > long_ago + timedelta(hours=1)

        await wait_for(marked)


@pytest.mark.timeout(2400)
async def test_code_server_at_its_own_origin_wakes_from_warm_and_its_websocket_connects(
        hosted: Stack, code_server_image: str, tmp_path: Path) -> None:
    stack = hosted
    origin = stack.gw.origins.workspace_origin("csh")
    assert origin.startswith("http://csh.ws.localhost:")
    async with real_reconciler(stack, tmp_path):
        # A real WARM workspace of the code-server image: provisioned by the reconciler,
        # no container until the link wakes it.
        await stack.store.create(id="csh", owner="tester", image_ref=code_server_image,
                                 desired_state=DesiredState.WARM)
        await stack.hints.publish("csh")

        async def warm() -> bool:
            row = await stack.store.get("csh")
            return (row is not None and row.status is Status.WARM
                    and row.operation is Operation.NONE)

        await wait_for(warm, timeout=120)
        link = await mint(stack, "csh")
        assert link.startswith(origin + "/?access="), link
        async with browser_page() as page:
            sockets, frames = watch_sockets(page)
            response = await page.goto(link)  # type: ignore[attr-defined]
            assert response.status == 200
            # The loading page, at the root of the workspace's origin (token gone) ...
            assert page.url.startswith(origin + "/") and "access=" not in page.url  # type: ignore[attr-defined]
            await page.wait_for_selector("#status-text")  # type: ignore[attr-defined]
            row = await stack.store.get("csh")
            assert row is not None and row.desired_state is DesiredState.RUNNING
            # ... reloads onto the workbench once the container runs and answers.
            await page.wait_for_selector(".monaco-workbench", timeout=300_000)  # type: ignore[attr-defined]
            assert page.url.startswith(origin + "/")  # type: ignore[attr-defined]
            deadline = time.monotonic() + 60
            while not frames and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            ARTIFACTS.mkdir(exist_ok=True)
            await asyncio.sleep(2)  # let the workbench paint its parts for the screenshot
            await page.screenshot(path=str(ARTIFACTS / "code-server-host-mode.png"))  # type: ignore[attr-defined]
            urls = [ws.url for ws in sockets]  # type: ignore[attr-defined]
            ws_origin = origin.replace("http://", "ws://") + "/"
            assert urls and all(u.startswith(ws_origin) for u in urls), urls
            assert frames, "the workbench's WebSocket received nothing"
            text = await page.inner_text("body")  # type: ignore[attr-defined]
            assert "Cannot reconnect" not in text
            assert stack.gw.activity.sockets.get("csh", 0) >= 1, stack.gw.activity.sockets
            row = await stack.store.get("csh")
            assert row is not None and row.status is Status.RUNNING
