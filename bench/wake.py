#!/usr/bin/env python3
"""Wake benchmark: a WARM workspace of the real code-server image -> first proxied 200.

    .venv/bin/python bench/wake.py [--rounds 5]

Runs `codehub serve` as a child (embedded PostgreSQL and local archives under a temp
dir, the in-process hint bus, the local Docker engine, a network and name prefixes of its
own, firewall off), builds the code-server image with scripts/build-code-server-image
(node and npm installed from apt when missing), creates one workspace through the API
and, for each round, puts it back to WARM (container removed, home kept) and then acts as
a browser that holds a valid cookie:

  t0      GET /w/{id}/ (Accept: text/html) -> the loading page (this request wakes it)
          GET /w/{id}/_codehub/events, read `state` events until one says ready
  t_ready the ready event arrives; the page reloads: GET /w/{id}/ again
  t_200   the first 200 proxied from code-server (HTML of the workbench)

Meanwhile `docker events` gives the container's create and start times (the engine's own
timestamps), and the bench probes the container's health path itself every 10 ms from
the start event on (t_health: first 200). The total t_200 - t0 is split into

  container   create -> start event (the engine creating and starting the container)
  code-server start event -> its health path answers (node booting code-server)
  CodeHub     the rest: hint delivery, reconcile step scheduling and recording, image and
              volume checks before create, CodeHub's health polling, the RUNNING record
              and its hint to the event stream, the stream's health check, the reload

and CodeHub's part is broken down further into before-create (t0 -> create), after-health
(t_health -> t_ready) and reload (t_ready -> t_200). Goal (issue 13): CodeHub <= 0.5 s p50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tools import ensure_tools  # noqa: E402

WID = "wake-bench"
JSON = {"Content-Type": "application/json"}
HTML = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate",
        "Sec-Fetch-Dest": "document"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_image() -> str:
    ensure_tools({"docker": "docker.io", "node": "nodejs", "npm": "npm"})
    print("building/reusing the code-server image (minutes the first time)", flush=True)
    proc = subprocess.run([str(ROOT / "scripts" / "build-code-server-image")],
                          capture_output=True, text=True, timeout=2400, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"code-server image could not be built:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


@dataclass
class Round:
    t0: float
    create: float
    start: float
    health: float
    ready: float
    ok: float
    warm_gateway: float
    warm_direct: float

    @property
    def total(self) -> float:
        return self.ok - self.t0

    @property
    def container(self) -> float:
        return self.start - self.create

    @property
    def code_server(self) -> float:
        return self.health - self.start

    @property
    def codehub(self) -> float:
        return self.total - self.container - self.code_server


class DockerEvents:
    """`docker events` for one container name: action -> wall-clock time (engine's)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: dict[str, float] = {}
        self.changed = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> DockerEvents:
        self.proc = await asyncio.create_subprocess_exec(
            "docker", "events", "--filter", "type=container", "--filter",
            f"container={self.name}", "--format", "{{json .}}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        self.task = asyncio.create_task(self._read())
        await asyncio.sleep(0.3)  # subscribed before anything happens
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            ev = json.loads(line)
            self.seen.setdefault(ev.get("Action") or ev.get("status"), ev["timeNano"] / 1e9)
            self.changed.set()

    async def wait(self, action: str, timeout: float = 120) -> float:
        async with asyncio.timeout(timeout):
            while action not in self.seen:
                self.changed.clear()
                await self.changed.wait()
        return self.seen[action]

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def container_address(name: str, network: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "docker", "inspect", "--format",
        f"{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}", name,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode().strip()


async def probe_health(http: aiohttp.ClientSession, name: str, network: str) -> float:
    """Wall-clock time of the first 200 from the container's /healthz (every 10 ms)."""
    address = ""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not address:
            address = await container_address(name, network)
        if address:
            try:
                async with http.get(f"http://{address}:8080/healthz",
                                    timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return time.time()
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
        await asyncio.sleep(0.01)
    raise SystemExit("code-server did not answer /healthz within 120 s")


async def wait_status(http: aiohttp.ClientSession, api: str, status: str) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        async with http.get(f"{api}/workspaces/{WID}") as r:
            body = await r.json()
        if body["status"] == status and body["operation"] == "NONE":
            return
        if body["status"] == "ERROR":
            raise SystemExit(f"workspace failed: {body['error']}")
        await asyncio.sleep(0.2)
    raise SystemExit(f"workspace not {status} after 180 s: {body}")


async def one_round(browser: aiohttp.ClientSession, probes: aiohttp.ClientSession, base: str,
                    container: str, network: str) -> Round:
    page = f"{base}/w/{WID}/"
    async with DockerEvents(container) as events:
        t0 = time.time()
        async with browser.get(page, headers=HTML, allow_redirects=False) as r:
            body = await r.text()
            if r.status != 200 or "codehub-state" not in body:
                raise SystemExit(f"expected the loading page, got {r.status}: {body[:300]}")
        probe = asyncio.create_task(_probe_after_start(events, probes, container, network))
        ready = 0.0
        async with browser.get(page + "_codehub/events",
                               headers={"Accept": "text/event-stream"},
                               timeout=aiohttp.ClientTimeout(total=180)) as r:
            event = ""
            async for raw in r.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "state":
                    state = json.loads(line[5:])
                    if state["ready"]:
                        ready = time.time()
                        break
                    if state["status"] in ("ERROR", "COLD", "UNKNOWN"):
                        raise SystemExit(f"workspace went {state['status']}: {state}")
        if not ready:
            raise SystemExit("event stream ended without a ready state")
        # The page's reload: the same URL, now proxied to code-server.
        async with browser.get(page, headers=HTML) as r:
            text = await r.text()
            ok = time.time()
            if r.status != 200 or "codehub-state" in text:
                raise SystemExit(f"reload did not reach code-server: {r.status} {text[:300]}")
        health = await probe
        create = await events.wait("create")
        start = await events.wait("start")
        # Reference, code-server now warm: the same page through the gateway and direct.
        address = await container_address(container, network)
        t1 = time.time()
        async with browser.get(page, headers=HTML) as r:
            await r.read()
        t2 = time.time()
        async with probes.get(f"http://{address}:8080/", headers=HTML) as r:
            await r.read()
        t3 = time.time()
    return Round(t0, create, start, health, ready, ok, t2 - t1, t3 - t2)


async def _probe_after_start(events: DockerEvents, probes: aiohttp.ClientSession,
                             container: str, network: str) -> float:
    await events.wait("start")
    return await probe_health(probes, container, network)


@contextlib.asynccontextmanager
async def codehub(image: str, tmp: Path, tag: str) -> AsyncIterator[tuple[str, str, str]]:
    port = free_port()
    network = f"codehub-wake-{tag}"
    prefix = f"codehub-wake-{tag}-"
    env = {**os.environ,
           "CODEHUB_DATA_DIR": str(tmp / "data"),
           "CODEHUB_SERVER__PORT": str(port),
           "CODEHUB_DOCKER__WORKSPACE_IMAGE": image,
           "CODEHUB_DOCKER__NETWORK": network,
           "CODEHUB_DOCKER__CONTAINER_PREFIX": prefix,
           "CODEHUB_DOCKER__VOLUME_PREFIX": f"codehub-wake-home-{tag}-",
           "CODEHUB_DOCKER__FIREWALL": "off",
           "CODEHUB_LOG_LEVEL": "WARNING",
           "PYTHONPATH": str(ROOT)}
    for key in [k for k in env if k.startswith("CODEHUB_") and k not in (
            "CODEHUB_DATA_DIR", "CODEHUB_LOG_LEVEL") and not k.startswith(
            ("CODEHUB_SERVER__", "CODEHUB_DOCKER__"))]:
        env.pop(key)  # the bench's own choices only (an unset section = embedded default)
    log = open(tmp / "serve.log", "wb")  # noqa: SIM115, ASYNC230 (once, at start-up)
    serve = ("import sys; from codehub.cli import main; "
             "sys.argv = ['codehub', 'serve']; sys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", serve], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 90
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"codehub serve exited {proc.returncode}:\n"
                                     f"{(tmp / 'serve.log').read_text()[-3000:]}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(base + "/readyz") as r:
                        if r.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise SystemExit("codehub serve not ready after 90 s")
                await asyncio.sleep(0.3)
        yield base, network, prefix + WID
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def cleanup_docker(container: str, network: str, tag: str) -> None:
    def run(*args: str) -> str:
        return subprocess.run(["docker", *args], capture_output=True, text=True,
                              check=False).stdout
    run("rm", "-f", container)
    for vol in run("volume", "ls", "-q", "--filter", f"name=codehub-wake-home-{tag}-").split():
        run("volume", "rm", "-f", vol)
    run("network", "rm", network)


def fmt(samples: list[float]) -> str:
    return f"p50 {statistics.median(samples):6.3f} s  max {max(samples):6.3f} s"


async def main(rounds: int) -> None:
    image = build_image()
    tag = f"{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="codehub-wake-"))
    container = network = ""
    try:
        async with codehub(image, tmp, tag) as (base, network, container):
            api = base + "/api/v1"
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(headers=JSON) as http, \
                    aiohttp.ClientSession(cookie_jar=jar) as browser, \
                    aiohttp.ClientSession() as probes:
                async with http.post(f"{api}/workspaces", json={
                        "id": WID, "owner": "bench", "desired_state": "RUNNING",
                        "warm_ttl_seconds": 36000, "cold_ttl_seconds": 360000}) as r:
                    if r.status != 201:
                        raise SystemExit(f"create: {r.status} {await r.text()}")
                await wait_status(http, api, "RUNNING")  # first start: image layers cached
                async with http.post(f"{api}/workspaces/{WID}/access-links", json={}) as r:
                    link = (await r.json())["url"]
                link = base + link[link.index("/w/"):]
                async with browser.get(link, headers=HTML, allow_redirects=False) as r:
                    if r.status != 303:
                        raise SystemExit(f"access link: {r.status} {await r.text()}")
                results: list[Round] = []
                for i in range(rounds):
                    async with http.patch(f"{api}/workspaces/{WID}",
                                          json={"desired_state": "WARM"}) as r:
                        assert r.status in (200, 202), await r.text()
                    await wait_status(http, api, "WARM")
                    await asyncio.sleep(1.0)  # the machine settles after the stop
                    rd = await one_round(browser, probes, base, container, network)
                    results.append(rd)
                    print(f"round {i + 1}: total {rd.total:.3f} s = container "
                          f"{rd.container:.3f} + code-server {rd.code_server:.3f} + CodeHub "
                          f"{rd.codehub:.3f} (before create {rd.create - rd.t0:.3f}, after "
                          f"health {rd.ready - rd.health:.3f}, reload {rd.ok - rd.ready:.3f})",
                          flush=True)
    finally:
        if container:
            cleanup_docker(container, network, tag)
        shutil.rmtree(tmp, ignore_errors=True)
    report(results)


def report(results: list[Round]) -> None:
    total = [r.total for r in results]
    med = statistics.median(total)
    print(f"\nWARM -> first proxied 200, {len(results)} rounds (code-server image):")
    rows: list[tuple[str, list[float]]] = [
        ("total", total),
        ("container create+start", [r.container for r in results]),
        ("code-server ready", [r.code_server for r in results]),
        ("CodeHub overhead", [r.codehub for r in results]),
        ("  before create", [r.create - r.t0 for r in results]),
        ("  health -> ready event", [r.ready - r.health for r in results]),
        ("  reload", [r.ok - r.ready for r in results])]
    for name, samples in rows:
        share = statistics.median(samples) / med
        print(f"{name:<24} {fmt(samples)}  share {share:6.1%}")
    print(f"reference, the same page again (code-server warm): through the gateway "
          f"{fmt([r.warm_gateway for r in results])}, direct "
          f"{fmt([r.warm_direct for r in results])}")
    p50 = statistics.median([r.codehub for r in results])
    print(f"CodeHub's own share p50 {p50:.3f} s: goal <= 0.5 s "
          f"{'met' if p50 <= 0.5 else 'NOT met'}")


def _args() -> Any:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(_args().rounds))
