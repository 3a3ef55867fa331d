"""Talking to the Docker engine, shared by the runtime and storage adapters: how its
failures become AdapterError / PermanentError, "404 means gone", ownership labels, images
made present, container log tails.

Guarantees:
- `docker_failure()` words an engine or transport failure as a retryable AdapterError
  naming what we were doing; `TRANSPORT_ERRORS` are the exceptions it covers.
- `ensure_image()` returns once the image is present, pulling it when missing; an image
  that cannot be pulled is a PermanentError naming it (it is not coming back by retrying).
- `log_tail()` is the last lines of a container's output for an error message; it never
  raises.
- `docker_errors(what)` turns every engine or transport failure inside it into
  `docker_failure(what, ...)`.
- `inspect_container()` / `inspect_volume()` / `inspect_network()` return None for what
  does not exist (404); `remove_container()` / `delete_volume()` / `delete_network()`
  return quietly for it (and for a container removal already in progress). Every other
  failure is a retryable AdapterError naming what was asked.
- `require_ours(labels, what, workspace_id)` raises PermanentError unless the labels say
  CodeHub manages the object (and, with `workspace_id`, that it belongs to that workspace).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import aiodocker
import aiohttp
from aiodocker.networks import DockerNetwork
from aiodocker.volumes import DockerVolume

from ..constants import LABEL_MANAGED_BY, LABEL_MANAGED_BY_VALUE, LABEL_WORKSPACE_ID
from ..interfaces import AdapterError, PermanentError
from ..model import WORKSPACE_ID

TRANSPORT_ERRORS = (aiodocker.DockerError, aiohttp.ClientError, TimeoutError)
LOG_LINES = 20


def docker_failure(what: str, exc: BaseException) -> AdapterError:
    if isinstance(exc, aiodocker.DockerError):
        return AdapterError(f"{what}: Docker said {exc.status}: {exc.message}")
    return AdapterError(f"{what}: {type(exc).__name__}: {exc}")


async def ensure_image(docker: aiodocker.Docker, image: str) -> None:
    try:
        await docker.images.inspect(image)
        return
    except aiodocker.DockerError as exc:
        if exc.status != 404:
            raise docker_failure(f"inspecting image {image}", exc) from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise docker_failure(f"inspecting image {image}", exc) from exc
    try:
        answer = await docker.images.pull(image)
        errors = [m["error"] for m in answer if isinstance(m, dict) and m.get("error")]
        if errors:
            raise aiodocker.DockerError(500, "; ".join(errors))
        await docker.images.inspect(image)
    except aiodocker.DockerError as exc:
        raise PermanentError(f"image {image!r} is not present and could not be pulled: "
                             f"{exc.message}") from exc


async def log_tail(docker: aiodocker.Docker, name: str, lines: int = LOG_LINES) -> str:
    """"; last log lines:\\n..." of a container, for an error message."""
    with contextlib.suppress(*TRANSPORT_ERRORS):
        got = await docker.containers.container(name).log(
            stdout=True, stderr=True, tail=lines, timeout=aiohttp.ClientTimeout(total=10))
        text = "".join(got).rstrip()
        return f"; last log lines:\n{text}" if text else "; no log output"
    return "; logs unavailable"


def check_workspace_id(workspace_id: str) -> None:
    """Refuse an id outside model.WORKSPACE_ID before it becomes part of an engine name."""
    if not WORKSPACE_ID.fullmatch(workspace_id):
        raise PermanentError(f"invalid workspace id {workspace_id!r}")


@contextlib.contextmanager
def docker_errors(what: str) -> Iterator[None]:
    """Engine and transport failures are worth retrying; say what we were doing."""
    try:
        yield
    except TRANSPORT_ERRORS as exc:
        raise docker_failure(what, exc) from exc


def _gone(exc: aiodocker.DockerError) -> bool:
    return exc.status == 404


async def inspect_container(docker: aiodocker.Docker, name: str) -> dict[str, Any] | None:
    """The container's inspect document; None when there is none of that name."""
    with docker_errors(f"inspecting container {name}"):
        try:
            container = await docker.containers.get(name)
        except aiodocker.DockerError as exc:
            if _gone(exc):
                return None
            raise
    info: dict[str, Any] = container._container
    return info


async def inspect_volume(docker: aiodocker.Docker, name: str) -> dict[str, Any] | None:
    """The volume's inspect document; None when there is none of that name."""
    with docker_errors(f"inspecting volume {name}"):
        try:
            volume = DockerVolume(docker, name)  # type: ignore[no-untyped-call]
            info: dict[str, Any] = await volume.show()  # type: ignore[no-untyped-call]
        except aiodocker.DockerError as exc:
            if _gone(exc):
                return None
            raise
    return info


async def remove_container(docker: aiodocker.Docker, name: str) -> None:
    """Force-remove a container; one that is gone (or going) is fine."""
    with docker_errors(f"removing container {name}"):
        try:
            await docker.containers.container(name).delete(force=True)
        except aiodocker.DockerError as exc:
            if _gone(exc) or (exc.status == 409 and "already in progress" in exc.message):
                return
            raise


async def delete_volume(docker: aiodocker.Docker, name: str) -> None:
    """Delete a volume; one that is gone is fine. 409: still in use by a container."""
    with docker_errors(f"deleting volume {name}"):
        try:
            await DockerVolume(docker, name).delete()  # type: ignore[no-untyped-call]
        except aiodocker.DockerError as exc:
            if not _gone(exc):
                raise


def require_ours(labels: Mapping[str, str] | None, what: str,
                 workspace_id: str | None = None) -> None:
    """PermanentError unless CodeHub manages `what` (of `workspace_id`, when given)."""
    labels = labels or {}
    if labels.get(LABEL_MANAGED_BY) != LABEL_MANAGED_BY_VALUE:
        raise PermanentError(f"{what} exists and is not managed by CodeHub: refusing to "
                             "touch it")
    if workspace_id is not None and labels.get(LABEL_WORKSPACE_ID) != workspace_id:
        raise PermanentError(f"{what} belongs to workspace "
                             f"{labels.get(LABEL_WORKSPACE_ID)!r}, not {workspace_id!r}")


async def inspect_network(docker: aiodocker.Docker, name: str) -> dict[str, Any] | None:
    """The network's inspect document; None when there is none of that name (or id)."""
    with docker_errors(f"inspecting network {name}"):
        try:
            network = DockerNetwork(docker, name)  # type: ignore[no-untyped-call]
            info: dict[str, Any] = await network.show()
        except aiodocker.DockerError as exc:
            if _gone(exc):
                return None
            raise
    return info


async def delete_network(docker: aiodocker.Docker, name: str) -> None:
    """Delete a network; one that is gone is fine."""
    with docker_errors(f"deleting network {name}"):
        try:
            await DockerNetwork(docker, name).delete()  # type: ignore[no-untyped-call]
        except aiodocker.DockerError as exc:
            if not _gone(exc):
                raise
