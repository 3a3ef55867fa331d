"""An InstanceController whose "containers" are entries in a dict.

Guarantees (those of codehub.backends.docker.containers that a caller can see):
- A workspace has at most one instance, named `<name_prefix><id>` and listed by
  `list_managed()`; every instance carries a `number` that changes only when an instance
  is made anew.
- `start()` is idempotent: a RUNNING or STARTING instance of the same image and volume is
  reused (a STARTING one is waited for); a stopped, failed or different one is replaced. It
  returns once the instance is RUNNING. It refuses (PermanentError, nothing made) an
  invalid workspace id, a volume its storage does not hold, and an image not in `images`
  (the message names it).
- `stop()` and `delete()` remove the instance; a missing one is fine; the volume is never
  touched.
- `get_status()` changes nothing; MISSING when there is no instance.
- `resolve_upstream()` raises AdapterError unless the instance is up (RUNNING or STARTING);
  otherwise it returns `upstream` (one address for every workspace: a test points it at
  a server of its own).
- `fail()` and `vanish()` do to an instance what a crash or an operator does behind the
  controller's back (its process exits; it is removed), for tests of those who observe it.
- Every call yields to the event loop at least once, and `start()` between making an
  instance and seeing it RUNNING, so a cancellation can land in the middle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from ...interfaces import (
    AdapterError,
    InstanceController,
    InstanceStatus,
    ManagedResource,
    PermanentError,
    UpstreamInfo,
)
from ...model import InstanceState
from ..rules import check_workspace_id
from .lifetime import Lifetime
from .storage import MemoryStorageProvider

LOOPBACK = UpstreamInfo("127.0.0.1", 8080)


@dataclass(slots=True)
class MemoryInstance:
    workspace_id: str
    image_ref: str
    volume_name: str
    number: int
    state: InstanceState = InstanceState.STARTING
    exit_code: int | None = None


class MemoryInstanceController(Lifetime, InstanceController):
    """Instances in `instances` (workspace id -> MemoryInstance)."""

    def __init__(self, storage: MemoryStorageProvider | None = None, *,
                 images: Iterable[str] | None = None, name_prefix: str = "codehub-ws-",
                 upstream: UpstreamInfo = LOOPBACK) -> None:
        """`storage`: whose volumes `start()` accepts (None: any volume name). `images`:
        the images that exist (None: every image)."""
        self.instances: dict[str, MemoryInstance] = {}
        self._storage = storage
        self._images = None if images is None else frozenset(images)
        self._prefix = name_prefix
        self._upstream = upstream
        self._made = 0

    def container_name(self, workspace_id: str) -> str:
        check_workspace_id(workspace_id)
        return f"{self._prefix}{workspace_id}"

    async def start(self, workspace_id: str, image_ref: str, volume_name: str) -> None:
        self.container_name(workspace_id)
        await asyncio.sleep(0)
        if self._storage is not None and volume_name not in self._storage.volumes:
            raise PermanentError(f"home volume {volume_name} does not exist")
        current = self.instances.get(workspace_id)
        if not self._reusable(current, image_ref, volume_name):
            if self._images is not None and image_ref not in self._images:
                raise PermanentError(f"image {image_ref!r} is not present and could not "
                                     "be pulled")
            self._made += 1
            current = MemoryInstance(workspace_id, image_ref, volume_name, self._made)
            self.instances[workspace_id] = current
        await asyncio.sleep(0)  # made, not yet healthy
        if self.instances.get(workspace_id) is not current:
            raise AdapterError(f"instance of {workspace_id} disappeared while starting")
        assert current is not None
        current.state = InstanceState.RUNNING

    @staticmethod
    def _reusable(current: MemoryInstance | None, image_ref: str, volume_name: str) -> bool:
        return (current is not None
                and current.state in (InstanceState.RUNNING, InstanceState.STARTING)
                and current.image_ref == image_ref and current.volume_name == volume_name)

    async def stop(self, workspace_id: str) -> None:
        self.container_name(workspace_id)
        await asyncio.sleep(0)
        self.instances.pop(workspace_id, None)

    async def delete(self, workspace_id: str) -> None:
        await self.stop(workspace_id)

    async def get_status(self, workspace_id: str) -> InstanceStatus:
        self.container_name(workspace_id)
        await asyncio.sleep(0)
        current = self.instances.get(workspace_id)
        if current is None:
            return InstanceStatus(InstanceState.MISSING)
        return InstanceStatus(current.state, exit_code=current.exit_code)

    async def resolve_upstream(self, workspace_id: str) -> UpstreamInfo:
        self.container_name(workspace_id)
        await asyncio.sleep(0)
        current = self.instances.get(workspace_id)
        if current is None:
            raise AdapterError(f"workspace {workspace_id} has no container")
        if current.state not in (InstanceState.RUNNING, InstanceState.STARTING):
            raise AdapterError(f"container {self._prefix}{workspace_id} is not running")
        return self._upstream

    async def list_managed(self) -> list[ManagedResource]:
        await asyncio.sleep(0)
        return sorted((ManagedResource("container", f"{self._prefix}{wid}", wid)
                       for wid in self.instances), key=lambda r: r.name)

    # --- what happens behind the controller's back (for tests) ------------------------

    def fail(self, workspace_id: str, exit_code: int = 137) -> None:
        """The instance's process exits with `exit_code` (0: STOPPED, else FAILED)."""
        current = self.instances[workspace_id]
        current.exit_code = exit_code
        current.state = InstanceState.STOPPED if exit_code == 0 else InstanceState.FAILED

    def vanish(self, workspace_id: str) -> None:
        """The instance is removed by someone else."""
        self.instances.pop(workspace_id, None)
