"""Idle means nobody is working (issue #14), with real code-server in headless chromium.

Each test makes a real code-server workspace with a short warm TTL (WARM_TTL) through the
real reconciler, whose TTL sweep runs every SWEEP seconds, and opens its workbench from an
access link, as a person would:

- an untouched tab lets its workspace step down to WARM, and then a key press in that
  still-open tab brings the person back into a working IDE through the loading page;
- with gateway.activity = "traffic" the same untouched tab keeps it RUNNING (as before);
- a terminal running a loop that prints, with no input, keeps it RUNNING;
- typing in the editor every 20 s keeps it RUNNING.

Waits are bounded (wait_for) and the "stays RUNNING" checks watch the row over WATCH
(2 x WARM_TTL: an idle workspace would have stepped down by WARM_TTL + SWEEP): nothing
asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from gateway_support import Stack, Upstream, open_stack, wait_for
from test_gateway_browser import ARTIFACTS, browser_page, mint, real_reconciler
from test_gateway_code_server import code_server_image

from codehub.metrics import STEPPED_DOWN_UNDER_OPEN_TAB
from codehub.model import DesiredState, Operation, Status

__all__ = ["code_server_image"]

WARM_TTL = 30
SWEEP = 3
WATCH = 2 * WARM_TTL
# What each document loaded in the tab was, kept across reloads: "title|has the script"
# (the title as the HTML gives it: the workbench sets its own later). Not in frames.
RECORD_DOCUMENTS = """
(() => {
  if (window.top !== window) return;
  addEventListener('DOMContentLoaded', () => {
    const seen = JSON.parse(sessionStorage.getItem('__documents') || '[]');
    const script = !!document.querySelector('script[src="./_codehub/presence.js"]');
    seen.push(document.title + '|' + script);
    sessionStorage.setItem('__documents', JSON.stringify(seen));
  });
})();
"""


async def _settled(stack: Stack, wid: str, status: Status) -> bool:
    row = await stack.store.get(wid)
    return (row is not None and row.status is status and row.operation is Operation.NONE
            and row.desired_state.value == status.value)


@contextlib.asynccontextmanager
async def workbench(stack: Stack, tmp_path: Path, image: str, wid: str,
                    ) -> AsyncIterator[Any]:
    """A RUNNING code-server workspace (warm TTL WARM_TTL) and a tab with its workbench."""
    async with real_reconciler(stack, tmp_path, ttl_sweep_interval=SWEEP):
        await stack.store.create(id=wid, owner="tester", image_ref=image,
                                 desired_state=DesiredState.RUNNING, warm_ttl_seconds=WARM_TTL)
        await stack.hints.publish(wid)
        await wait_for(lambda: _settled(stack, wid, Status.RUNNING), timeout=240)
        link = await mint(stack, wid)
        async with browser_page() as page:
            await page.add_init_script(RECORD_DOCUMENTS)  # type: ignore[attr-defined]
            response = await page.goto(link, timeout=60_000)  # type: ignore[attr-defined]
            assert response.status == 200
            await page.wait_for_selector(".monaco-workbench", timeout=120_000)  # type: ignore[attr-defined]
            await page.wait_for_selector(".statusbar", timeout=60_000)  # type: ignore[attr-defined]
            await wait_for(lambda: stack.gw.activity.sockets.get(wid, 0) >= 1, timeout=60)
            yield page


async def documents(page: Any) -> list[str]:
    return list(await page.evaluate("JSON.parse(sessionStorage.getItem('__documents') || '[]')"))


async def stays_running(stack: Stack, wid: str, seconds: float) -> None:
    """The row is RUNNING, and meant to stay so, at every check over `seconds`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        row = await stack.store.get(wid)
        assert row is not None and row.desired_state is DesiredState.RUNNING, row
        assert row.status is Status.RUNNING, row
        await asyncio.sleep(1)


@pytest.mark.timeout(1200)
async def test_an_untouched_tab_steps_down_and_a_key_press_brings_the_ide_back(
        stack: Stack, code_server_image: str, tmp_path: Path) -> None:
    async with workbench(stack, tmp_path, code_server_image, "idle") as page:
        assert await documents(page) == ["|true"]  # the workbench, with the script
        before = STEPPED_DOWN_UNDER_OPEN_TAB._value.get()
        # (a) Nobody touches the tab: its keep-alives do not count; it steps down.
        await wait_for(lambda: _settled(stack, "idle", Status.WARM),
                       timeout=WARM_TTL + SWEEP + 120, interval=0.5)
        assert STEPPED_DOWN_UNDER_OPEN_TAB._value.get() == before + 1
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "idle-stepped-down.png"))
        # (d) A key press in the still-open tab: the loading page, then a working IDE.
        await page.keyboard.press("Escape")
        await page.wait_for_function(  # type: ignore[attr-defined]
            "JSON.parse(sessionStorage.getItem('__documents') || '[]').length >= 3",
            timeout=240_000)
        await page.wait_for_selector(".monaco-workbench", timeout=120_000)
        await page.wait_for_selector(".statusbar", timeout=60_000)
        seen = await documents(page)
        assert seen[1] == "Starting idle · CodeHub|false", seen  # the loading page
        assert seen[-1] == "|true", seen  # a new workbench, with the script
        row = await stack.store.get("idle")
        assert row is not None and row.status is Status.RUNNING
        await asyncio.sleep(3)  # the remote connection settles
        assert "Cannot reconnect" not in await page.inner_text("body")
        await page.screenshot(path=str(ARTIFACTS / "idle-back.png"))


@pytest.mark.timeout(1200)
async def test_with_activity_traffic_an_untouched_tab_keeps_its_workspace_running(
        database_url: str, echo_upstream: Upstream, code_server_image: str,
        tmp_path: Path) -> None:
    async for stack in open_stack(database_url, echo_upstream, tmp_path, activity="traffic"):
        async with workbench(stack, tmp_path, code_server_image, "busy") as page:
            assert await documents(page) == ["|false"]  # the workbench, no script
            await stays_running(stack, "busy", WATCH)


@pytest.mark.timeout(1200)
async def test_a_terminal_printing_without_input_keeps_its_workspace_running(
        stack: Stack, code_server_image: str, tmp_path: Path) -> None:
    async with workbench(stack, tmp_path, code_server_image, "term") as page:
        await page.keyboard.press("Control+Backquote")
        await page.wait_for_selector(".xterm", timeout=60_000)
        await asyncio.sleep(2)
        await page.locator(".xterm").first.click()
        await page.keyboard.type("while true; do date; sleep 5; done\n", delay=20)
        await asyncio.sleep(6)  # a line or two printed (seen in the screenshot)
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "idle-terminal.png"))
        row = await stack.store.get("term")
        assert row is not None
        started = row.last_access_at
        await stays_running(stack, "term", WATCH)
        row = await stack.store.get("term")
        # marked until the end, with nobody typing: the output counted
        assert row is not None and row.last_access_at > started + timedelta(
            seconds=WATCH - WARM_TTL / 2)


@pytest.mark.timeout(1200)
async def test_typing_in_the_editor_every_20_seconds_keeps_its_workspace_running(
        stack: Stack, code_server_image: str, tmp_path: Path) -> None:
    async with workbench(stack, tmp_path, code_server_image, "typing") as page:
        await page.keyboard.press("Control+n")  # an untitled editor
        editor = ".editor-instance .monaco-editor .view-lines"
        await page.wait_for_selector(editor, timeout=30_000)
        await page.click(editor)
        for i in range(WATCH // 20 + 1):
            await page.keyboard.type(f"line {i}\n", delay=20)
            await stays_running(stack, "typing", 20)
