"""Real code-server under the hardened defaults, end to end through `codehub serve`.

`codehub serve` runs as a user starts it (firewall on, egress none, workspaces with no
capabilities, no new privileges, a pids limit and a read-only root, size-limited homes
mounted nosuid,nodev), against the test's
PostgreSQL, S3 (moto) and Docker. In headless chromium: the workbench loads, a terminal
opens and runs a command, a file edited and saved in the editor is there, and the home
survives RUNNING -> COLD -> restore -> RUNNING.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
from harness.services import DockerEngine, free_port
from playwright.async_api import TimeoutError as PlaywrightTimeout
from test_gateway_browser import ARTIFACTS, browser_page

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hardened-e2e-token"


@pytest.fixture(scope="module")
def code_server_image(docker_engine: DockerEngine) -> str:
    proc = subprocess.run([str(ROOT / "scripts" / "build-code-server-image")],
                          capture_output=True, text=True, timeout=2400, check=False,
                          env=docker_engine.env())
    if proc.returncode != 0:
        pytest.fail(f"code-server image could not be built: {proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]



@pytest.fixture
async def serve(tmp_path: Path, database_url: str, s3_settings: dict[str, str],
                docker_engine: DockerEngine, docker_prefix: str, code_server_image: str
                ) -> AsyncIterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEHUB_")}
    env.update(docker_engine.env())
    env.update({
        "CODEHUB_DATA_DIR": str(tmp_path / "data"),
        "CODEHUB_SERVER__PORT": str(port),
        "CODEHUB_DATABASE__URL": database_url,
        "CODEHUB_S3__ENDPOINT_URL": s3_settings["endpoint_url"],
        "CODEHUB_S3__REGION": s3_settings["region"],
        "CODEHUB_S3__ACCESS_KEY_ID": s3_settings["access_key_id"],
        "CODEHUB_S3__SECRET_ACCESS_KEY": s3_settings["secret_access_key"],
        "CODEHUB_S3__BUCKET": s3_settings["bucket"],
        "CODEHUB_DOCKER__NETWORK": f"{docker_prefix}-net",
        "CODEHUB_DOCKER__CONTAINER_PREFIX": f"{docker_prefix}-ws-",
        "CODEHUB_DOCKER__VOLUME_PREFIX": f"{docker_prefix}-home-",
        "CODEHUB_DOCKER__WORKSPACE_IMAGE": code_server_image,
        "CODEHUB_DOCKER__EGRESS": "none",
        "CODEHUB_AUTH__ADMIN_TOKENS": TOKEN,
        "CODEHUB_RECONCILER__RESYNC_INTERVAL": "2",
        # Size-limited homes (the default) with their images and mounts the test's own.
        "CODEHUB_DOCKER__HOME_SIZE_LIMIT_MIB": "512",
        "CODEHUB_DOCKER__HOME_IMAGE_DIR": str(tmp_path / "homes"),
        "CODEHUB_DOCKER__HOME_MOUNT_DIR": str(tmp_path / "mnt"),
    })
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "codehub.cli", "serve"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    async with http.get(f"{base}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "serve did not become ready"
                await asyncio.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        subprocess.run(["sh", "-c", f"grep -o ' {tmp_path}/mnt/[^ ]*' /proc/mounts | "
                        "xargs -r -n1 umount -l"], capture_output=True)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "hardened-serve.log").write_text((tmp_path / "serve.log").read_text())


async def _api(http: aiohttp.ClientSession, method: str, url: str,
               body: dict[str, Any] | None = None) -> tuple[int, Any]:
    async with http.request(method, url, json=body,
                            headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        return resp.status, await resp.json()


async def _wait_status(http: aiohttp.ClientSession, base: str, wid: str, status: str,
                       timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        code, ws = await _api(http, "GET", f"{base}/api/v1/workspaces/{wid}")
        assert code == 200, ws
        if ws["status"] == status and ws["operation"] == "NONE":
            return dict(ws)
        assert ws["status"] != "ERROR", ws
        assert time.monotonic() < deadline, ws
        await asyncio.sleep(0.5)


async def _cat(docker: aiodocker.Docker, container: str, path: str) -> str:
    run = await docker.containers.container(container).exec(["cat", path])
    out = b""
    async with run.start(detach=False) as stream:
        while (msg := await stream.read_out()) is not None:
            out += msg.data
    return out.decode(errors="replace")


async def _wait_for_text(docker: aiodocker.Docker, container: str, text: str,
                         failure: str, timeout: float = 60) -> None:
    """Until /home/coder/notes.txt in the workspace contains `text` (`timeout` s at most)."""
    deadline = time.monotonic() + timeout
    while text not in await _cat(docker, container, "/home/coder/notes.txt"):
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.5)


async def _type_in_terminal(page: Any, docker: aiodocker.Docker, container: str) -> None:
    """Type a command that writes notes.txt into the terminal, until it has run. A shell
    still starting (slow on a busy machine) drops what is typed before its prompt: type
    again, at most three times, with a fresh line each time."""
    for attempt in range(3):
        await asyncio.sleep(2)
        await page.locator(".xterm").first.click()
        await page.keyboard.type("\necho from-the-terminal-$((6*7)) > notes.txt\n", delay=20)
        try:
            await _wait_for_text(docker, container, "from-the-terminal-42",
                                 "the terminal's command never ran", timeout=20)
            return
        except AssertionError:
            if attempt == 2:
                raise


async def _open_in_editor(page: Any, path: str) -> str:
    """Quick-open `path` and wait for its editor; the selector of its text. Under load the
    file search can answer after the first row is drawn, so the row clicked is the one
    naming the file, and the whole step is tried again when no editor came."""
    editor = ".editor-instance .monaco-editor .view-lines"
    name = path.rsplit("/", 1)[-1]
    for attempt in range(3):
        await page.keyboard.press("Escape")
        await page.keyboard.press("Control+p")
        await page.wait_for_selector(".quick-input-widget", timeout=30_000)
        await page.keyboard.type(path, delay=30)
        row = page.locator(".quick-input-list .monaco-list-row", has_text=name).first
        try:
            await row.wait_for(timeout=30_000)
            await row.click()
            await page.wait_for_selector(editor, timeout=30_000)
            return editor
        except PlaywrightTimeout:  # try again, then fail with it
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def _open_workbench(page: Any, link: str) -> None:
    response = await page.goto(link, timeout=60_000)
    assert response.status == 200
    await page.wait_for_selector(".monaco-workbench", timeout=120_000)
    await page.wait_for_selector(".statusbar", timeout=60_000)
    await asyncio.sleep(3)  # the remote connection and the file explorer settle


@pytest.mark.timeout(1800)
async def test_code_server_under_the_hardened_defaults_runs_a_terminal_saves_a_file_and_keeps_it_through_cold(  # noqa: E501
        serve: str, docker: aiodocker.Docker, docker_prefix: str) -> None:
    base = serve
    container = f"{docker_prefix}-ws-cs"
    async with aiohttp.ClientSession() as http:
        code, ws = await _api(http, "POST", f"{base}/api/v1/workspaces",
                              {"id": "cs", "owner": "tester"})
        assert code == 201, ws
        await _wait_status(http, base, "cs", "RUNNING")
        code, link = await _api(http, "POST", f"{base}/api/v1/workspaces/cs/access-links")
        assert code == 201, link
        ARTIFACTS.mkdir(exist_ok=True)
        async with browser_page() as page:
            await _open_workbench(page, link["url"])
            # A terminal: run a command that writes a file.
            await page.keyboard.press("Control+Backquote")
            await page.wait_for_selector(".xterm", timeout=60_000)
            await _type_in_terminal(page, docker, container)
            await page.screenshot(path=str(ARTIFACTS / "hardened-terminal.png"))
            # The editor: open the file, add a line, save.
            editor = await _open_in_editor(page, "/home/coder/notes.txt")
            await page.click(editor)
            await page.keyboard.press("Control+End")
            await page.keyboard.type("typed-in-the-editor\n", delay=20)
            await page.keyboard.press("Control+s")
            await _wait_for_text(docker, container, "typed-in-the-editor",
                                 "the editor's save never reached the home")
            await page.screenshot(path=str(ARTIFACTS / "hardened-editor.png"))
        saved = await _cat(docker, container, "/home/coder/notes.txt")

        # RUNNING -> COLD (archived, volume gone) -> restore -> RUNNING: the file is back.
        code, _ = await _api(http, "PATCH", f"{base}/api/v1/workspaces/cs",
                             {"desired_state": "COLD"})
        assert code == 202
        cold = await _wait_status(http, base, "cs", "COLD")
        assert cold["archive"] and cold["archive"]["size"] > 0
        code, _ = await _api(http, "POST", f"{base}/api/v1/workspaces/cs/restore",
                             {"start": True})
        assert code == 202
        await _wait_status(http, base, "cs", "RUNNING")
        assert await _cat(docker, container, "/home/coder/notes.txt") == saved
        mounts = await _cat(docker, container, "/proc/mounts")
        home = next(line for line in mounts.splitlines() if " /home/coder " in line)
        assert " ext4 " in home and "nosuid" in home and "nodev" in home, home
        code, link = await _api(http, "POST", f"{base}/api/v1/workspaces/cs/access-links")
        async with browser_page() as page:
            await _open_workbench(page, link["url"])
            text = await page.inner_text("body")
            assert "Cannot reconnect" not in text
            await page.screenshot(path=str(ARTIFACTS / "hardened-after-restore.png"))
