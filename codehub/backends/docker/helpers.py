"""Helper containers: how the storage adapter reaches a volume's files without running
anything in the workspace's image.

Guarantees:
- A helper is named after its volume and role (`<volume>-<role>`), so a re-run after a
  crash finds what the killed run left; it carries `codehub.managed-by=codehub`,
  `codehub.workspace-id=<id>` and role `storage-helper`, runs `helper_image`, mounts its
  volume at MOUNT with NoCopy (Docker never copies image files into a volume), has no
  network and is never started, unless `create(run=...)` gives it a program and a network.
- `create()` replaces a helper left under that name and refuses (PermanentError) a
  container of that name that is not one of our helpers.
- `remove()` and `remove_for(volume)` ignore what is already gone; `remove_for` removes
  every helper of ours that mounts the volume (they pin it).
- `read_tar(name)` yields what the helper sees at MOUNT as Docker's plain tar (never
  gzipped by Docker), in blocks of at least `chunk_size` bytes but the last; the response
  is closed however the reader leaves (while Docker still writes a stream it holds the
  helper's lock, and removing the helper would wait forever).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator
from typing import Any

import aiodocker
import aiohttp

from ...constants import LABEL_MANAGED_BY, LABEL_MANAGED_BY_VALUE, LABEL_ROLE
from ...failpoints import failpoint
from ...interfaces import PermanentError
from ..rules import ownership_labels
from .engine import (
    docker_errors,
    docker_failure,
    ensure_image,
    inspect_container,
    remove_container,
)

ROLE_HELPER = "storage-helper"
MOUNT = "/home/coder"  # where helpers mount the volume; its basename is the archive's top
MOUNT_PARENT = "/home"
TOP = "coder"
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)


async def read_block(content: aiohttp.StreamReader, size: int) -> bytes:
    """At least `size` bytes (fewer only at the end of the stream), gathered from whatever
    the connection has buffered: `readany()` hands over buffered pieces without copying."""
    pieces: list[bytes] = []
    got = 0
    while got < size:
        piece = await content.readany()
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class Helpers:
    """The helper containers of one storage adapter."""

    def __init__(self, docker: aiodocker.Docker, image: str) -> None:
        self._docker = docker
        self.image = image
        self._image_ok = False

    @staticmethod
    def name(volume: str, role: str) -> str:
        return f"{volume}-{role}"

    async def create(self, volume: str, workspace_id: str, role: str, *,
                     read_only: bool, run: dict[str, Any] | None = None) -> str:
        """A container mounting `volume` at MOUNT; returns its name. Never started unless
        `run` (merged into its config, HostConfig key by key) gives it something to run."""
        name = self.name(volume, role)
        await self._remove_stale(name)
        config: dict[str, Any] = {
            "Image": self.image,
            "Entrypoint": ["/codehub-helper-is-never-started"],
            "Labels": ownership_labels(workspace_id, ROLE_HELPER),
            "NetworkDisabled": True,
            "HostConfig": {
                "NetworkMode": "none",
                "Mounts": [{"Type": "volume", "Source": volume, "Target": MOUNT,
                            "ReadOnly": read_only, "VolumeOptions": {"NoCopy": True}}],
            },
        }
        if run is not None:
            host_config = {**config["HostConfig"], **run.get("HostConfig", {})}
            config.update(run)
            config["HostConfig"] = host_config
        await self._ensure_image()
        for attempt in (1, 2):
            try:
                await self._docker.containers.create(config, name=name)
                return name
            except aiodocker.DockerError as exc:
                if exc.status == 409 and attempt == 1:  # a concurrent leftover: replace it
                    await self.remove(name)
                    continue
                raise docker_failure(f"creating helper {name}", exc) from exc
        raise AssertionError("unreachable")

    async def remove(self, name: str) -> None:
        await remove_container(self._docker, name)

    async def remove_quietly(self, name: str) -> None:
        with contextlib.suppress(Exception):
            await self.remove(name)

    async def remove_for(self, volume: str) -> None:
        """Remove our helper containers that mount `volume` (they pin it)."""
        filters = {"label": [f"{LABEL_MANAGED_BY}={LABEL_MANAGED_BY_VALUE}",
                             f"{LABEL_ROLE}={ROLE_HELPER}"],
                   "volume": [volume]}
        with docker_errors(f"listing helpers of {volume}"):
            helpers = await self._docker.containers.list(all=True, filters=json.dumps(filters))
        for helper in helpers:
            await self.remove(helper.id)

    async def read_tar(self, name: str, chunk_size: int) -> AsyncGenerator[bytes, None]:
        """The helper's MOUNT as a tar stream; see the module's guarantees."""
        first = True
        with docker_errors(f"reading volume through {name}"):
            async with self._docker._query(
                f"containers/{name}/archive", params={"path": MOUNT}, timeout=STREAM_TIMEOUT,
                # Without this Docker gzips the tar itself (one Go thread, ~30 MB/s) only
                # for aiohttp to inflate it again.
                headers={"Accept-Encoding": "identity"},
            ) as resp:
                with contextlib.closing(resp):
                    while block := await read_block(resp.content, chunk_size):
                        if first:
                            first = False
                            failpoint("archive.after_stream_start")
                        yield block

    async def put_archive(self, name: str, data: bytes) -> None:
        """Extract a small tar (in memory) at MOUNT_PARENT through the helper `name`."""
        with docker_errors(f"extracting into {name}"):
            await self._docker.containers.container(  # type: ignore[no-untyped-call]
                name).put_archive(MOUNT_PARENT, data)

    async def _remove_stale(self, name: str) -> None:
        """Remove a helper a killed run left under `name`; refuse a container not ours."""
        existing = await inspect_container(self._docker, name)
        if existing is None:
            return
        labels = existing["Config"].get("Labels") or {}
        if labels.get(LABEL_ROLE) != ROLE_HELPER or labels.get(LABEL_MANAGED_BY) != \
                LABEL_MANAGED_BY_VALUE:
            raise PermanentError(f"container {name} exists and is not a CodeHub helper")
        await self.remove(name)

    async def _ensure_image(self) -> None:
        if not self._image_ok:
            await ensure_image(self._docker, self.image)
            self._image_ok = True
