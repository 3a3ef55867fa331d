"""A Docker bridge network of ours, and this process's own address on it.

Guarantees:
- `ensure()` creates the network when it is missing (bridge, `Internal: true`: its
  containers reach nothing outside it, and nothing outside reaches them but the host and
  containers joined to it; labelled `codehub.managed-by=codehub`) and, when this process
  runs in a container (`gateway_container`), joins that container to it. Idempotent and
  safe to race with another replica; after the first success it costs nothing.
- `own_address()` is the IPv4 address at which containers on the network reach this
  process: its container's address on the network, or, on the host, the bridge's gateway
  address (a Linux engine assigns it to the host's bridge interface, also for internal
  networks).
Engine failures raise AdapterError naming the network.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiodocker

from ..constants import LABEL_MANAGED_BY, LABEL_MANAGED_BY_VALUE
from ..interfaces import AdapterError
from .engine import TRANSPORT_ERRORS, docker_failure


class BridgeNetwork:
    """One internal bridge network, created on first use."""

    def __init__(self, docker: aiodocker.Docker, name: str,
                 gateway_container: str | None = None) -> None:
        self._docker = docker
        self.name = name
        self._gateway_container = gateway_container or None
        self._ready = False
        self._lock = asyncio.Lock()

    async def ensure(self) -> None:
        if self._ready:
            return
        async with self._lock:
            if self._ready:
                return
            try:
                await self._create_if_missing()
                if self._gateway_container:
                    await self._join_gateway()
            except TRANSPORT_ERRORS as exc:
                raise docker_failure(f"preparing network {self.name}", exc) from exc
            self._ready = True

    def forget(self) -> None:
        """The network was found missing: the next `ensure()` checks (and creates) again."""
        self._ready = False

    async def own_address(self) -> str:
        """Checks the network on every call: one removed behind our back is made again (and
        this process's container joined to it again)."""
        for attempt in (1, 2):
            await self.ensure()
            try:
                address = await self._lookup_own_address()
            except TRANSPORT_ERRORS as exc:
                raise docker_failure(
                    f"finding this process's address on network {self.name}", exc) from exc
            if address:
                return address
            if attempt == 1:
                self.forget()
        where = (f"container {self._gateway_container}" if self._gateway_container
                 else "the host")
        raise AdapterError(f"{where} has no IPv4 address on network {self.name}")

    async def _lookup_own_address(self) -> str:
        """"" when the network (or this container's place on it) is missing."""
        if self._gateway_container:
            info = await self._docker.containers.get(self._gateway_container)
            attached = (info["NetworkSettings"].get("Networks") or {}).get(self.name) or {}
            return str(attached.get("IPAddress") or "")
        try:
            network = await self._docker.networks.get(self.name)
            return _bridge_gateway(await network.show())
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return ""
            raise

    async def _create_if_missing(self) -> None:
        try:
            await self._docker.networks.get(self.name)
            return
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise
        try:
            await self._docker.networks.create({
                "Name": self.name, "Driver": "bridge", "Internal": True,
                "CheckDuplicate": True,
                "Labels": {LABEL_MANAGED_BY: LABEL_MANAGED_BY_VALUE},
            })
        except aiodocker.DockerError as exc:
            if exc.status != 409:  # created concurrently
                raise

    async def _join_gateway(self) -> None:
        assert self._gateway_container is not None
        gateway = await self._docker.containers.get(self._gateway_container)
        if self.name in (gateway["NetworkSettings"].get("Networks") or {}):
            return
        network = await self._docker.networks.get(self.name)
        try:
            await network.connect({"Container": self._gateway_container})
        except aiodocker.DockerError as exc:
            if "already exists" not in exc.message:
                raise


def _bridge_gateway(info: dict[str, Any]) -> str:
    for entry in (info.get("IPAM") or {}).get("Config") or []:
        gateway = str(entry.get("Gateway") or "").split("/")[0]
        if gateway and ":" not in gateway:
            return gateway
    return ""
