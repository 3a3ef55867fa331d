"""SIGTERM lets an in-flight proxied request finish, then `codehub serve` exits cleanly.

A real `codehub serve` (API + gateway + reconciler) on real PostgreSQL and Docker with the
echo workspace image; the request is a slow one answered by the workspace.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
from harness.services import DockerEngine
from reconciler_stack import free_port


async def test_sigterm_lets_in_flight_requests_finish(
        database_url: str, docker_engine: DockerEngine, workspace_image: str,
        docker_prefix: str, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEHUB_")}
    env.update({
        "CODEHUB_DATA_DIR": str(tmp_path / "data"), "CODEHUB_SERVER__PORT": str(port),
        "CODEHUB_SERVER__SHUTDOWN_TIMEOUT": "8",
        "CODEHUB_DATABASE__URL": database_url, "CODEHUB_DOCKER__URL": docker_engine.url,
        "CODEHUB_DOCKER__NETWORK": f"{docker_prefix}-net",
        "CODEHUB_DOCKER__CONTAINER_PREFIX": f"{docker_prefix}-ws-",
        "CODEHUB_DOCKER__VOLUME_PREFIX": f"{docker_prefix}-home-",
        "CODEHUB_DOCKER__WORKSPACE_IMAGE": workspace_image,
        "CODEHUB_AUTH__ADMIN_TOKENS": "secret-token",
        "CODEHUB_RECONCILER__RESYNC_INTERVAL": "1",
    })
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "codehub.cli", "serve"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    api = {"Authorization": "Bearer secret-token"}
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with asyncio.timeout(60):
                while True:
                    try:
                        async with http.get(f"{base}/readyz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.2)
            async with http.post(f"{base}/api/v1/workspaces", headers=api,
                                 json={"id": "graceful", "owner": "tester"}) as r:
                assert r.status == 201, await r.text()
            async with asyncio.timeout(60):
                while True:
                    async with http.get(f"{base}/api/v1/workspaces/graceful",
                                        headers=api) as r:
                        if (await r.json())["status"] == "RUNNING":
                            break
                    await asyncio.sleep(0.2)
            async with http.post(f"{base}/api/v1/workspaces/graceful/access-links",
                                 headers=api, json={}) as r:
                link = (await r.json())["url"]
            async with http.get(link) as r:  # exchanges the link for the cookie
                assert r.status == 200

            async def slow() -> tuple[int, bytes]:
                async with http.get(f"{base}/w/graceful/_echo/slow?seconds=3") as r:
                    return r.status, await r.read()

            in_flight = asyncio.create_task(slow())
            await asyncio.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            status, body = await asyncio.wait_for(in_flight, 10)
            assert status == 200, body
        rc = await asyncio.to_thread(proc.wait, 10)
        assert rc == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
