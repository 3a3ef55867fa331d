"""Talking to the Docker engine, shared by the runtime and storage adapters: how its
failures become AdapterError / PermanentError, images made present, container log tails.

- `docker_failure()` words an engine or transport failure as a retryable AdapterError
  naming what we were doing; `TRANSPORT_ERRORS` are the exceptions it covers.
- `ensure_image()` returns once the image is present, pulling it when missing; an image
  that cannot be pulled is a PermanentError naming it (it is not coming back by retrying).
- `log_tail()` is the last lines of a container's output for an error message; it never
  raises.
"""

from __future__ import annotations

import contextlib

import aiodocker
import aiohttp

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
