"""Workspace containers on a Docker engine (aiodocker).

Guarantees:
- A workspace has at most one container, `<name_prefix><id>`, labelled
  `codehub.managed-by=codehub`, `codehub.workspace-id=<id>`, `codehub.role=workspace`, on
  one dedicated bridge network, home volume at /home/coder, no published ports, restart
  policy "no", the configured command, and the confinement of its Sandbox
  (codehub.backends.docker.sandbox: no capabilities, no new privileges, pids/memory/CPU limits,
  a read-only root with a private /tmp).
- `start()` is idempotent: a running container built from the same spec (image, volume,
  command, limits, network, port: hashed into the `codehub.spec` label) is reused; a stopped,
  failed, paused or different one is replaced, and so is one that has been running for
  longer than `start_timeout` without answering its health check. It returns only once
  the workspace answers HTTP 200 on `health_path` at its address on the network, and
  raises `AdapterError` with the container's last log lines when it exits or
  `start_timeout` passes first. An image that is neither present nor pullable is a
  `PermanentError` naming it.
- `stop()` and `delete()` force-remove the container; a missing one is fine. The volume
  is never touched. A container of that name without our label is never removed
  (PermanentError).
- `start()` refuses (PermanentError) a volume that does not exist: Docker would otherwise
  create an empty one and the workspace would come up on a blank home.
- `get_status()` changes nothing and costs one inspect plus, for a running container, one
  HTTP probe of at most `probe_timeout` seconds.
- The network is created on first use when missing, with its firewall
  (codehub.backends.docker.network, codehub.backends.docker.firewall): a workspace reaches no other
  workspace, no address of the host, and outside only what the egress policy allows;
  only the host's network namespace, where this process runs, reaches the workspaces.

Reachability: on a Linux engine the host holds the bridge's gateway address, so a process
on the host reaches container addresses on an internal bridge directly (checked on Docker
20.10; `Internal` only removes the route out and the NAT). The tests assert this.

Lifetime (codehub.interfaces.Adapter): leaving `async with` (or `close()`) closes the HTTP
session used for probes; the engine client is the caller's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import aiodocker
import aiohttp

from ...constants import (
    LABEL_MANAGED_BY,
    LABEL_MANAGED_BY_VALUE,
    LABEL_ROLE,
    LABEL_WORKSPACE_ID,
    ROLE_WORKSPACE,
)
from ...interfaces import (
    AdapterError,
    InstanceController,
    InstanceStatus,
    ManagedResource,
    PermanentError,
    UpstreamInfo,
)
from ...model import InstanceState
from ..rules import check_workspace_id, ownership_labels, require_ours
from .engine import (
    TRANSPORT_ERRORS,
    docker_failure,
    ensure_image,
    inspect_container,
    inspect_volume,
    log_tail,
    remove_container,
)
from .network import BridgeNetwork
from .sandbox import Sandbox

LABEL_SPEC = "codehub.spec"
HOME = "/home/coder"
DEFAULT_COMMAND = ("--auth", "none", "--bind-addr", "0.0.0.0:8080")


def _age_seconds(started_at: str) -> float:
    """Seconds since Docker's RFC 3339 `StartedAt` (nanoseconds cut to microseconds)."""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$",
                     started_at)
    if match is None:
        return 0.0
    base, frac, zone = match.groups()
    stamp = f"{base}.{(frac or '0')[:6].ljust(6, '0')}{'+00:00' if zone == 'Z' else zone}"
    return (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds()


def _bridges(docker: aiodocker.Docker, network: str | BridgeNetwork | Sequence[BridgeNetwork],
             gateway_container: str | None) -> tuple[BridgeNetwork, ...]:
    """The networks of a controller (see its `network` argument)."""
    if isinstance(network, str):
        network = BridgeNetwork(docker, network, gateway_container)
    bridges = (network,) if isinstance(network, BridgeNetwork) else tuple(network)
    if not bridges:
        raise ValueError("at least one network is needed")
    return bridges


def _sandbox(base: Sandbox, memory_limit_bytes: int | None, cpu_limit: float | None
             ) -> Sandbox:
    """`base` with the limits given outside it (None or 0: the sandbox's own)."""
    if memory_limit_bytes is None and cpu_limit is None:
        return base
    return dataclasses.replace(
        base, memory_limit_bytes=memory_limit_bytes or base.memory_limit_bytes,
        cpu_limit=cpu_limit or base.cpu_limit)


class DockerInstanceController(InstanceController):
    """InstanceController that runs each workspace as one container."""

    def __init__(
        self,
        *,
        docker: aiodocker.Docker,
        network: str | BridgeNetwork | Sequence[BridgeNetwork] = "codehub-workspaces",
        name_prefix: str = "codehub-ws-",
        memory_limit_bytes: int | None = None,
        cpu_limit: float | None = None,
        sandbox: Sandbox | None = None,
        command: Sequence[str] = DEFAULT_COMMAND,
        port: int = 8080,
        health_path: str = "/healthz",
        start_timeout: float = 60.0,
        gateway_container: str | None = None,
        prepare_volume: Callable[[str], Awaitable[None]] | None = None,
        probe_timeout: float = 1.0,
        poll_interval: float = 0.05,
        inspect_interval: float = 0.5,
    ) -> None:
        """`network`: a name (a BridgeNetwork without firewall is made for it: tests and
        operators who isolate by other means), the BridgeNetwork to use, or several: each
        workspace then joins one of them, chosen by a hash of its id (a Linux bridge takes
        at most 1,024 ports, so one network holds about a thousand workspaces).
        `memory_limit_bytes` / `cpu_limit` (cores, as NanoCpus) None or 0: no limit; they
        override the sandbox's. `command` is the container's Cmd (arguments to the
        image's entrypoint). While starting, the health check is probed every
        `poll_interval` seconds (a refused connection costs well under a millisecond, and
        every probe saved is wake-up latency) and the container inspected every
        `inspect_interval` (to notice it exiting)."""
        self._docker = docker
        self._bridges = _bridges(docker, network, gateway_container)
        self._names = {b.name for b in self._bridges}
        self.network = self._bridges[0].name
        self._prefix = name_prefix
        self.sandbox = _sandbox(sandbox or Sandbox(), memory_limit_bytes, cpu_limit)
        self._command = list(command)
        self._port = port
        self._health_path = health_path if health_path.startswith("/") else "/" + health_path
        self._start_timeout = start_timeout
        self._prepare_volume = prepare_volume
        self._probe_timeout = probe_timeout
        self._poll_interval = poll_interval
        self._inspect_interval = inspect_interval
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Release the probe session (made again by the next probe). Idempotent."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def container_name(self, workspace_id: str) -> str:
        check_workspace_id(workspace_id)
        return f"{self._prefix}{workspace_id}"

    # --- InstanceController ------------------------------------------------------------

    async def start(self, workspace_id: str, image_ref: str, volume_name: str) -> None:
        name = self.container_name(workspace_id)
        await self._require_volume(volume_name)
        if self._prepare_volume is not None:
            await self._prepare_volume(volume_name)  # e.g. mount a size-limited home
        bridge = self.bridge_for(workspace_id)
        await bridge.ensure()
        spec = self._spec(image_ref, volume_name, bridge.name)
        info = await self._inspect(name)
        if info is None or not await self._reusable(info, spec, bridge.name):
            if info is not None:
                self._require_ours(info)
                await self._remove(name)
            await ensure_image(self._docker, image_ref)
            await self._create(name, workspace_id, image_ref, volume_name, spec, bridge)
            try:
                await self._docker.containers.container(name).start()
            except aiodocker.DockerError as exc:
                if exc.status != 304:  # 304: already started
                    raise docker_failure(f"starting {name}", exc) from exc
        await self._wait_healthy(name)

    async def stop(self, workspace_id: str) -> None:
        name = self.container_name(workspace_id)
        info = await self._inspect(name)
        if info is not None:
            self._require_ours(info)
            await self._remove(name)

    async def delete(self, workspace_id: str) -> None:
        # Nothing else is per-workspace: the network is shared and the volume is storage's.
        await self.stop(workspace_id)

    async def get_status(self, workspace_id: str) -> InstanceStatus:
        info = await self._inspect(self.container_name(workspace_id))
        if info is None:
            return InstanceStatus(InstanceState.MISSING)
        state = info.get("State", {})
        status = state.get("Status", "")
        if state.get("Paused"):
            return InstanceStatus(InstanceState.STOPPED, detail="paused")
        if state.get("Running"):
            address = self._address(info)
            if address is not None and await self._probe(address):
                return InstanceStatus(InstanceState.RUNNING)
            return InstanceStatus(InstanceState.STARTING, detail=status)
        code = int(state.get("ExitCode") or 0)
        if status == "created" or code == 0:
            return InstanceStatus(InstanceState.STOPPED, exit_code=code, detail=status)
        detail = "out of memory" if state.get("OOMKilled") else (state.get("Error") or status)
        return InstanceStatus(InstanceState.FAILED, exit_code=code, detail=detail)

    async def resolve_upstream(self, workspace_id: str) -> UpstreamInfo:
        name = self.container_name(workspace_id)
        info = await self._inspect(name)
        if info is None:
            raise AdapterError(f"workspace {workspace_id} has no container")
        if not info.get("State", {}).get("Running"):
            raise AdapterError(f"container {name} is not running")
        address = self._address(info)
        if address is None:
            raise AdapterError(f"container {name} has no address on network "
                               f"{self.bridge_for(workspace_id).name}")
        return UpstreamInfo(host=address, port=self._port)

    async def list_managed(self) -> list[ManagedResource]:
        filters = {"label": [f"{LABEL_MANAGED_BY}={LABEL_MANAGED_BY_VALUE}",
                             f"{LABEL_ROLE}={ROLE_WORKSPACE}"]}
        try:
            found = await self._docker.containers.list(all=True, filters=json.dumps(filters))
        except TRANSPORT_ERRORS as exc:
            raise docker_failure("listing containers", exc) from exc
        out = []
        for c in found:
            names = [n.lstrip("/") for n in c["Names"]]
            labels = c["Labels"] or {}
            for n in names:
                if n.startswith(self._prefix) and LABEL_WORKSPACE_ID in labels:
                    out.append(ManagedResource("container", n, labels[LABEL_WORKSPACE_ID]))
        return sorted(out, key=lambda r: r.name)

    # --- helpers -----------------------------------------------------------------------

    def bridge_for(self, workspace_id: str) -> BridgeNetwork:
        """The network of a workspace: fixed by its id (and the number of networks)."""
        digest = hashlib.sha256(workspace_id.encode()).digest()
        return self._bridges[int.from_bytes(digest[:8], "big") % len(self._bridges)]

    async def _reusable(self, info: dict[str, Any], spec: str, network: str) -> bool:
        """Running, unpaused, built from this spec, on our network, and not a container that
        already had its whole start_timeout to become healthy and did not."""
        state = info.get("State", {})
        if not state.get("Running") or state.get("Paused"):
            return False
        if (info["Config"].get("Labels") or {}).get(LABEL_SPEC) != spec:
            return False
        if network not in (info["NetworkSettings"].get("Networks") or {}):
            return False
        if _age_seconds(state.get("StartedAt", "")) <= self._start_timeout:
            return True
        address = self._address(info)
        return address is not None and await self._probe(address)

    @staticmethod
    def _require_ours(info: dict[str, Any]) -> None:
        require_ours(info.get("Config", {}).get("Labels"),
                     f"container {info.get('Name', '?').lstrip('/')}")

    def _spec(self, image_ref: str, volume_name: str, network: str) -> str:
        spec = {"image": image_ref, "volume": volume_name, "command": self._command,
                "sandbox": self.sandbox.spec(), "network": network, "port": self._port}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def _address(self, info: dict[str, Any]) -> str | None:
        for name, net in (info.get("NetworkSettings", {}).get("Networks") or {}).items():
            if name in self._names and net and net.get("IPAddress"):
                return str(net["IPAddress"])
        return None

    async def _inspect(self, name: str) -> dict[str, Any] | None:
        return await inspect_container(self._docker, name)

    async def _require_volume(self, volume_name: str) -> None:
        """Docker would create a missing volume silently: never start on a blank home."""
        if await inspect_volume(self._docker, volume_name) is None:
            raise PermanentError(f"home volume {volume_name} does not exist")

    async def _remove(self, name: str) -> None:
        await remove_container(self._docker, name)

    async def _create(self, name: str, workspace_id: str, image_ref: str, volume_name: str,
                      spec: str, bridge: BridgeNetwork) -> None:
        host: dict[str, Any] = {
            "NetworkMode": bridge.name,
            "Mounts": [{"Type": "volume", "Source": volume_name, "Target": HOME}],
            "RestartPolicy": {"Name": "no"},
            "PortBindings": {},
            "PublishAllPorts": False,
            **self.sandbox.host_config(),
        }
        config: dict[str, Any] = {
            "Image": image_ref,
            "Cmd": self._command,
            "Labels": ownership_labels(workspace_id, ROLE_WORKSPACE, {LABEL_SPEC: spec}),
            "HostConfig": host,
            "NetworkingConfig": {"EndpointsConfig": {bridge.name: {}}},
        }
        for attempt in (1, 2):
            try:
                await self._docker.containers.create(config, name=name)
                return
            except aiodocker.DockerError as exc:
                if attempt == 1 and exc.status == 409:  # raced with another create: replace
                    await self._remove(name)
                    continue
                if attempt == 1 and exc.status == 404 and "network" in exc.message.lower():
                    bridge.forget()  # removed behind our back
                    await bridge.ensure()
                    continue
                raise docker_failure(f"creating {name}", exc) from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise docker_failure(f"creating {name}", exc) from exc

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # force_close: container addresses come and go; never reuse a stale connection.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                auto_decompress=False, trust_env=False)
        return self._session

    async def _probe(self, address: str) -> bool:
        url = f"http://{address}:{self._port}{self._health_path}"
        timeout = aiohttp.ClientTimeout(total=self._probe_timeout)
        try:
            async with self._http().get(url, timeout=timeout, allow_redirects=False) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _wait_healthy(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout
        address: str | None = None
        inspected = -float("inf")
        while True:
            if address is None or loop.time() - inspected >= self._inspect_interval:
                inspected = loop.time()
                info = await self._inspect(name)
                if info is None:
                    raise AdapterError(f"container {name} disappeared while starting")
                state = info.get("State", {})
                if not state.get("Running"):
                    raise AdapterError(
                        f"container {name} exited with code {state.get('ExitCode')} while "
                        f"starting{await log_tail(self._docker, name)}")
                address = self._address(info)
            if address is not None and await self._probe(address):
                return
            if loop.time() >= deadline:
                raise AdapterError(
                    f"container {name} did not answer {self._health_path} on port {self._port} "
                    f"within {self._start_timeout:g}s{await log_tail(self._docker, name)}")
            await asyncio.sleep(min(self._poll_interval, max(0.0, deadline - loop.time())))
