"""A whole reconciler on real services, for the lifecycle, chaos and Redis tests.

`Stack` holds a real PostgreSQL store, the Docker adapters (names prefixed so the test's
`docker_prefix` cleanup removes them), an S3 object store on moto, a hint bus and a
FakeClock, plus helpers to drive it and to look at a workspace's home from inside its
running container (what the user sees).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiodocker
import asyncpg
import pytest
from harness.services import DockerEngine, free_port

from codehub import store as store_mod
from codehub.backends.docker.containers import DockerInstanceController
from codehub.backends.docker.network import BridgeNetwork
from codehub.backends.docker.volumes import DockerVolumeStorage
from codehub.backends.objects import S3ObjectStore
from codehub.clock import FakeClock
from codehub.hints import RedisHintBus
from codehub.interfaces import HintBus
from codehub.model import DesiredState, Status, Workspace
from codehub.reconciler.controller import Controller, Schedule
from codehub.reconciler.reconciler import EventLog, Policy, Reconciler
from codehub.store import Store

# Files a user might have: nested dirs, modes, a symlink, a hidden file, an empty dir,
# a non-UTF-8 name, a file of 3 MiB.
WRITE_HOME = r"""
import os, sys
h = "/home/coder"
os.makedirs(h + "/project/src", exist_ok=True)
open(h + "/project/src/main.py", "w").write("print('hello')\n" * 100)
open(h + "/.bashrc", "w").write("export EDITOR=vi\n")
os.makedirs(h + "/empty", exist_ok=True)
os.chmod(h + "/project/src/main.py", 0o750)
if not os.path.lexists(h + "/link"):
    os.symlink("project/src/main.py", h + "/link")
open(os.fsencode(h) + b"/caf\xe9-latin1.txt", "wb").write(b"x" * 10)
with open(h + "/big.bin", "wb") as f:
    for i in range(48):
        f.write(bytes([i]) * 65536)
"""

MANIFEST = r"""
import hashlib, json, os, stat, sys
root = b"/home/coder"
out = []
for d, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(dirs + files):
        p = os.path.join(d, name)
        st = os.lstat(p)
        rel = os.path.relpath(p, root).decode("utf-8", "surrogateescape")
        e = {"path": rel, "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid}
        if stat.S_ISLNK(st.st_mode):
            e["target"] = os.readlink(p).decode("utf-8", "surrogateescape")
        elif stat.S_ISREG(st.st_mode):
            e["size"] = st.st_size
            e["sha256"] = hashlib.sha256(open(p, "rb").read()).hexdigest()
        out.append(e)
json.dump(out, sys.stdout, sort_keys=True)
"""


@dataclass
class Stack:
    pool: asyncpg.Pool
    store: Store
    docker: aiodocker.Docker
    objects: S3ObjectStore
    instances: DockerInstanceController
    storage: DockerVolumeStorage
    hints: HintBus
    clock: FakeClock
    image: str
    prefix: str
    schedule: Schedule
    policy: Policy
    events: EventLog | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def controller(self) -> Controller:
        reconciler = Reconciler(store=self.store, instances=self.instances,
                                storage=self.storage, clock=self.clock, policy=self.policy,
                                on_change=self.hints.publish, events=self.events)
        return Controller(reconciler=reconciler, store=self.store, hints=self.hints,
                          instances=self.instances, storage=self.storage,
                          objects=self.objects, clock=self.clock, schedule=self.schedule)

    def run_controller(self) -> Controller:
        c = self.controller()
        self.tasks.append(asyncio.create_task(c.lead()))
        return c

    async def create(self, wid: str, **kw: Any) -> Workspace:
        ws = await self.store.create(id=wid, owner="tester", image_ref=self.image,
                                     now=self.clock.now(), **kw)
        await self.hints.publish(wid)
        return ws

    async def want(self, wid: str, desired: DesiredState) -> None:
        assert await self.store.set_desired(wid, desired) is not None
        await self.hints.publish(wid)

    async def wait_status(self, wid: str, status: Status, timeout: float = 60,
                          step: Callable[[], Awaitable[None]] | None = None) -> Workspace:
        """Wait until the row settles at `status` (operation NONE)."""
        async with asyncio.timeout(timeout):
            while True:
                ws = await self.store.get(wid)
                if ws is not None and ws.status is status and ws.operation.value == "NONE":
                    return ws
                if step is not None:
                    await step()
                await asyncio.sleep(0.1)

    async def wait_gone(self, wid: str, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while await self.store.get(wid) is not None:
                await asyncio.sleep(0.1)

    async def exec(self, wid: str, script: str) -> str:
        """Run python3 in the workspace's container as its user; return stdout."""
        container = await self.docker.containers.get(f"{self.prefix}-ws-{wid}")
        ex = await container.exec(["python3", "-c", script], user="1000:1000",
                                  stdout=True, stderr=True)
        chunks = []
        async with ex.start(detach=False) as stream:
            while (msg := await stream.read_out()) is not None:
                if msg.stream == 1:
                    chunks.append(msg.data)
                else:
                    chunks.append(b"")
        info = await ex.inspect()
        assert info["ExitCode"] == 0, b"".join(chunks)
        return b"".join(chunks).decode()

    async def write_home(self, wid: str) -> None:
        await self.exec(wid, WRITE_HOME)

    async def manifest(self, wid: str) -> list[dict[str, Any]]:
        return list(json.loads(await self.exec(wid, MANIFEST)))

    async def leftovers(self) -> dict[str, list[str]]:
        """Docker objects and archives of this test that still exist."""
        containers = [c["Names"][0] for c in await self.docker.containers.list(all=True)
                      if any(self.prefix in n for n in c["Names"])]
        vols = (await self.docker.volumes.list()).get("Volumes") or []
        volumes = [v["Name"] for v in vols if self.prefix in v["Name"]]
        return {"containers": containers, "volumes": volumes,
                "archives": await self.objects.list_keys()}

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()


@asynccontextmanager
async def make_stack(*, database_url: str, hints: HintBus, s3_settings: dict[str, str],
                     docker_url: str, image: str, prefix: str,
                     schedule: Schedule | None = None, policy: Policy | None = None,
                     event_log: str | None = None) -> AsyncIterator[Stack]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=8)
    async with pool.acquire() as conn:
        await store_mod.migrate(conn)
    docker = aiodocker.Docker(url=docker_url)
    objects = S3ObjectStore(**s3_settings)
    await objects.open()
    instances = DockerInstanceController(
        docker=docker, network=f"{prefix}-net", name_prefix=f"{prefix}-ws-",
        memory_limit_bytes=256 << 20, start_timeout=60)
    storage = DockerVolumeStorage(docker=docker, objects=objects, helper_image=image,
                                  volume_prefix=f"{prefix}-home-",
                                  restore_network=BridgeNetwork(docker, f"{prefix}-restore"))
    clock = FakeClock(start=datetime.now(UTC))
    stack = Stack(pool=pool, store=Store(pool), docker=docker, objects=objects,
                  instances=instances, storage=storage, hints=hints, clock=clock,
                  image=image, prefix=prefix,
                  schedule=schedule or Schedule(workers=4, resync_interval=5,
                                                ttl_sweep_interval=10,
                                                default_warm_ttl=600,
                                                default_cold_ttl=3600),
                  policy=policy or Policy(max_failures=5, backoff_base=0.5, backoff_max=5,
                                          stuck_timeout=120),
                  events=EventLog(event_log) if event_log else None)
    try:
        yield stack
    finally:
        await stack.stop()
        if stack.events is not None:
            stack.events.close()
        await instances.close()
        await objects.close()
        await docker.close()
        await pool.close()



class Leader:
    """A `codehub serve` child; restarted clean whenever it dies."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self, failpoint: str | None = None) -> None:
        env = dict(self.env)
        if failpoint:
            env["CODEHUB_FAILPOINT"] = failpoint
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "codehub.cli", "serve"],
                                         env=env, stdout=out, stderr=subprocess.STDOUT)

    def check(self) -> None:
        """If the child died, count a SIGKILL and start a clean one."""
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is None:
            return
        assert rc == -signal.SIGKILL, f"leader exited {rc}; see {self.log}"
        self.kills += 1
        self.start()

    def tail(self, lines: int = 80) -> str:
        """The end of the children's log, for a failure's message."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "leader log (last lines):\n" + "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def leader_env(stack: Stack, *, database_url: str, redis_url: str,
               s3: dict[str, str], docker_url: str, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEHUB_")}
    p = stack.prefix
    env.update({
        "CODEHUB_DATA_DIR": str(data_dir), "CODEHUB_SERVER__PORT": str(free_port()),
        "CODEHUB_DATABASE__URL": database_url, "CODEHUB_REDIS__URL": redis_url,
        "CODEHUB_S3__ENDPOINT_URL": s3["endpoint_url"], "CODEHUB_S3__REGION": s3["region"],
        "CODEHUB_S3__ACCESS_KEY_ID": s3["access_key_id"],
        "CODEHUB_S3__SECRET_ACCESS_KEY": s3["secret_access_key"],
        "CODEHUB_S3__BUCKET": s3["bucket"],
        "CODEHUB_DOCKER__URL": docker_url, "CODEHUB_DOCKER__NETWORK": f"{p}-net",
        "CODEHUB_DOCKER__CONTAINER_PREFIX": f"{p}-ws-",
        "CODEHUB_DOCKER__VOLUME_PREFIX": f"{p}-home-",
        "CODEHUB_DOCKER__WORKSPACE_IMAGE": stack.image,
        "CODEHUB_DOCKER__MEMORY_LIMIT_MIB": "256", "CODEHUB_DOCKER__START_TIMEOUT": "60",
        "CODEHUB_RECONCILER__RESYNC_INTERVAL": "1",
        "CODEHUB_RECONCILER__LEADER_CHECK_INTERVAL": "0.5",
        "CODEHUB_RECONCILER__BACKOFF_BASE": "0.2", "CODEHUB_RECONCILER__BACKOFF_MAX": "2",
        "CODEHUB_RECONCILER__MAX_FAILURES": "50",
    })
    return env


@pytest.fixture
async def stack(database_url: str, redis_url: str, s3_settings: dict[str, str],
                docker_engine: DockerEngine, workspace_image: str,
                docker_prefix: str) -> AsyncIterator[Stack]:
    """A Stack on this test's database, Redis hints, bucket and Docker prefix."""
    hints = RedisHintBus(redis_url, retry_delay=0.2)
    try:
        async with make_stack(database_url=database_url, hints=hints,
                              s3_settings=s3_settings, docker_url=docker_engine.url,
                              image=workspace_image, prefix=docker_prefix) as s:
            yield s
    finally:
        await hints.close()
