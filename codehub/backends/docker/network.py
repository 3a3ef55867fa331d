"""A Docker bridge network of ours, its firewall, and this process's own address on it.

CodeHub runs in the Docker host's network namespace (on the host, or in a container run
with `--network host`): that is the one place from which every workspace is reachable,
and the firewall (codehub.backends.docker.firewall) makes it the only one.

Guarantees:
- `ensure()` creates the network when it is missing (bridge, inter-container traffic off,
  `Internal` unless its egress is "public", labelled `codehub.managed-by=codehub`), then
  installs its firewall chains (unless `firewall` is None: an operator who isolates
  workspaces by other means). An existing network of that name whose shape differs (an
  older CodeHub's internal bridge with inter-container traffic on, another egress) is
  made again when nothing is attached to it, and refused (PermanentError naming it)
  otherwise. Idempotent and safe to race with another replica; after the first success it
  costs nothing until `forget()`.
- With `gateway_container` set, `ensure()` checks that this container runs with the host's
  network (PermanentError otherwise: from any other namespace the firewall would cut the
  gateway off, or have to let a workspace-side address through).
- `own_address()` is the IPv4 address at which members of the network reach this
  process: the bridge's gateway address, which a Linux engine assigns to the host.
Engine failures raise AdapterError naming the network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiodocker

from ...constants import LABEL_MANAGED_BY, LABEL_MANAGED_BY_VALUE
from ...interfaces import AdapterError, PermanentError
from .engine import (
    TRANSPORT_ERRORS,
    delete_network,
    docker_failure,
    inspect_container,
    inspect_network,
)
from .firewall import Firewall, NetworkPolicy

ICC_OPTION = "com.docker.network.bridge.enable_icc"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"


class BridgeNetwork:
    """One bridge network with its firewall, created on first use."""

    def __init__(self, docker: aiodocker.Docker, name: str,
                 gateway_container: str | None = None, *,
                 firewall: Firewall | None = None, egress: str = "none",
                 allow: Sequence[str] = (), host_tcp: bool = False,
                 dns: Sequence[str] = ()) -> None:
        """`egress`: "none" or "public" (see codehub.backends.docker.firewall). `host_tcp`: members
        may open TCP connections to this process's address on the network (the restore
        network, whose only members are our helpers)."""
        if egress not in ("none", "public"):
            raise ValueError(f"invalid egress {egress!r}")
        self._docker = docker
        self.name = name
        self._gateway_container = gateway_container or None
        self._firewall = firewall
        self._egress = egress
        self._allow = tuple(allow)
        self._host_tcp = host_tcp
        self._dns = tuple(dns)
        self._ready = False
        self._address = ""
        self._lock = asyncio.Lock()

    @property
    def internal(self) -> bool:
        return self._egress == "none"

    async def ensure(self) -> None:
        if self._ready:
            return
        async with self._lock:
            if self._ready:
                return
            try:
                if self._gateway_container:
                    await self._require_host_network()
                info = await self._create_or_adopt()
            except TRANSPORT_ERRORS as exc:
                raise docker_failure(f"preparing network {self.name}", exc) from exc
            self._address = _bridge_gateway(info)
            if self._firewall is not None:
                await self._firewall.apply(NetworkPolicy(
                    interface=bridge_interface(info), egress=self._egress, allow=self._allow,
                    host_tcp=self._address if self._host_tcp else "", dns=self._dns))
            self._ready = True

    def forget(self) -> None:
        """The network was found missing: the next `ensure()` checks (and creates) again."""
        self._ready = False

    async def own_address(self) -> str:
        """Checks the network on every call: one removed behind our back is made again (with
        its firewall)."""
        for attempt in (1, 2):
            await self.ensure()
            info = await inspect_network(self._docker, self.name)
            address = "" if info is None else _bridge_gateway(info)
            if address:
                return address
            if attempt == 1:
                self.forget()
        raise AdapterError(f"the host has no IPv4 address on network {self.name}")

    async def _require_host_network(self) -> None:
        assert self._gateway_container is not None
        info = await inspect_container(self._docker, self._gateway_container)
        if info is None:
            raise PermanentError(
                f"docker.gateway_container {self._gateway_container!r} does not exist")
        mode = (info["HostConfig"] or {}).get("NetworkMode")
        if mode != "host":
            raise PermanentError(
                f"docker.gateway_container {self._gateway_container!r} runs with network "
                f"{mode!r}: run it with --network host (and --cap-add NET_ADMIN for the "
                "firewall), the only place from which workspaces are reachable")

    def _wanted(self, info: dict[str, Any]) -> bool:
        options = info.get("Options") or {}
        return (bool(info.get("Internal")) == self.internal
                and options.get(ICC_OPTION) == "false")

    async def _create_or_adopt(self) -> dict[str, Any]:
        for _ in range(3):
            info = await inspect_network(self._docker, self.name)
            if info is not None:
                if self._wanted(info):
                    return info
                if info.get("Containers"):
                    raise PermanentError(
                        f"network {self.name} exists with another shape (internal "
                        f"{info.get('Internal')}, inter-container traffic "
                        f"{(info.get('Options') or {}).get(ICC_OPTION, 'true')}) and has "
                        f"containers attached; remove them (or the network) so CodeHub can "
                        f"make it again with egress {self._egress!r} and no traffic between "
                        f"containers")
                await delete_network(self._docker, str(info["Id"]))
            try:
                await self._docker.networks.create({
                    "Name": self.name, "Driver": "bridge", "Internal": self.internal,
                    "CheckDuplicate": True, "Options": {ICC_OPTION: "false"},
                    "Labels": {LABEL_MANAGED_BY: LABEL_MANAGED_BY_VALUE},
                })
            except aiodocker.DockerError as exc:
                if exc.status != 409:  # created concurrently: read it back
                    raise
        raise AdapterError(f"network {self.name} keeps changing under us")


def bridge_interface(info: dict[str, Any]) -> str:
    """The host interface of a bridge network: its configured name or Docker's br-<id>."""
    name = (info.get("Options") or {}).get(BRIDGE_NAME_OPTION)
    return str(name) if name else f"br-{str(info['Id'])[:12]}"


def _bridge_gateway(info: dict[str, Any]) -> str:
    for entry in (info.get("IPAM") or {}).get("Config") or []:
        gateway = str(entry.get("Gateway") or "").split("/")[0]
        if gateway and ":" not in gateway:
            return gateway
    return ""
