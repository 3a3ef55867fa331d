"""A whole reconciler on real services, for the lifecycle, chaos and Redis tests.

`Stack` holds a real PostgreSQL store, the Docker adapters (names prefixed so the test's
`docker_prefix` cleanup removes them), an S3 object store on moto, a hint bus and a
FakeClock, plus helpers to drive it and to look at a workspace's home from inside its
running container (what the user sees).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiodocker
import asyncpg

from codehub import store as store_mod
from codehub.clock import FakeClock
from codehub.interfaces import HintBus
from codehub.model import DesiredState, Status, Workspace
from codehub.reconciler.controller import Controller, Schedule
from codehub.reconciler.reconciler import EventLog, Policy, Reconciler
from codehub.runtime.docker import DockerInstanceController
from codehub.storage.objects import S3ObjectStore
from codehub.storage.volumes import DockerVolumeStorage
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
    await objects.start()
    instances = DockerInstanceController(
        docker=docker, network=f"{prefix}-net", name_prefix=f"{prefix}-ws-",
        memory_limit_bytes=256 << 20, start_timeout=60)
    storage = DockerVolumeStorage(docker=docker, objects=objects, helper_image=image,
                                  volume_prefix=f"{prefix}-home-")
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
