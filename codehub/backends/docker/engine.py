"""Talking to the Docker engine, shared by the container and volume adapters: how its
failures become AdapterError / PermanentError, "404 means gone", images
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
- `engine_client(url)` is the engine's client for the process's lifetime: it logs the
  engine's version, or a warning when it does not answer (the service still starts;
  workspaces wait for the engine), and closes the client on the way out.
- `inspect_container()` / `inspect_volume()` / `inspect_network()` return None for what
  does not exist (404); `remove_container()` / `delete_volume()` / `delete_network()`
  return quietly for it (and for a container removal already in progress). Every other
  failure is a retryable AdapterError naming what was asked.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import aiodocker
import aiohttp
from aiodocker.networks import DockerNetwork
from aiodocker.volumes import DockerVolume

from ...interfaces import AdapterError, PermanentError

T = TypeVar("T")
log = logging.getLogger(__name__)
TRANSPORT_ERRORS = (aiodocker.DockerError, aiohttp.ClientError, TimeoutError)
LOG_LINES = 20


@contextlib.asynccontextmanager
async def engine_client(url: str | None) -> AsyncIterator[aiodocker.Docker]:
    docker = aiodocker.Docker(url=url or None)
    try:
        try:
            version = await docker.version()
            log.info("docker: engine %s at %s", version.get("Version"), docker.docker_host)
        except (*TRANSPORT_ERRORS, OSError) as exc:
            log.warning("docker: engine at %s not answering (%s); workspaces cannot start "
                        "until it does", docker.docker_host, exc)
        yield docker
    finally:
        await docker.close()


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


@contextlib.contextmanager
def docker_errors(what: str) -> Iterator[None]:
    """Engine and transport failures are worth retrying; say what we were doing."""
    try:
        yield
    except TRANSPORT_ERRORS as exc:
        raise docker_failure(what, exc) from exc


async def _unless_gone(what: str, request: Awaitable[T], *, going_is_gone: bool = False
                       ) -> T | None:
    """The answer to `request`; None when Docker says there is no such object (404), or
    (`going_is_gone`) that its removal is already in progress. Any other failure:
    docker_failure(what)."""
    with docker_errors(what):
        try:
            return await request
        except aiodocker.DockerError as exc:
            going = exc.status == 409 and "already in progress" in exc.message
            if exc.status == 404 or (going_is_gone and going):
                return None
            raise


async def inspect_container(docker: aiodocker.Docker, name: str) -> dict[str, Any] | None:
    """The container's inspect document; None when there is none of that name."""
    found = await _unless_gone(f"inspecting container {name}", docker.containers.get(name))
    return None if found is None else dict(found._container)


async def inspect_volume(docker: aiodocker.Docker, name: str) -> dict[str, Any] | None:
    """The volume's inspect document; None when there is none of that name."""
    volume = DockerVolume(docker, name)  # type: ignore[no-untyped-call]
    info: dict[str, Any] | None = await _unless_gone(
        f"inspecting volume {name}", volume.show())  # type: ignore[no-untyped-call]
    return info


async def inspect_network(docker: aiodocker.Docker, name: str) -> dict[str, Any] | None:
    """The network's inspect document; None when there is none of that name (or id)."""
    network = DockerNetwork(docker, name)  # type: ignore[no-untyped-call]
    info: dict[str, Any] | None = await _unless_gone(f"inspecting network {name}",
                                                     network.show())
    return info


async def remove_container(docker: aiodocker.Docker, name: str) -> None:
    """Force-remove a container; one that is gone (or going) is fine."""
    await _unless_gone(f"removing container {name}",
                       docker.containers.container(name).delete(force=True),
                       going_is_gone=True)


async def delete_volume(docker: aiodocker.Docker, name: str) -> None:
    """Delete a volume; one that is gone is fine. 409: still in use by a container."""
    volume = DockerVolume(docker, name)  # type: ignore[no-untyped-call]
    await _unless_gone(f"deleting volume {name}",
                       volume.delete())  # type: ignore[no-untyped-call]


async def delete_network(docker: aiodocker.Docker, name: str) -> None:
    """Delete a network; one that is gone is fine."""
    network = DockerNetwork(docker, name)  # type: ignore[no-untyped-call]
    await _unless_gone(f"deleting network {name}", network.delete())
