"""Test images built on this machine, without any container registry.

Guarantees:
- ``ensure_base_image`` returns ``codehub-base:<hash>``, built by ``scripts/build-base-image``
  (debootstrapped Debian bookworm + python3 + user coder uid 1000); the hash covers that
  script, which holds the package list.
- ``ensure_echo_image`` returns ``codehub-test-echo:<hash>``: ``tests/images/echo`` (the
  Dockerfile and server.py, see server.py's docstring for its behaviour) built FROM the
  base tag with ``docker build``; the hash covers the base tag and every file of that
  folder. It is also tagged ``codehub-test-echo:latest``.
- A tag that already exists is reused as it is: with nothing changed both calls together
  take well under a second. Concurrent builds on one machine build once (flock).
- Every docker command talks to the engine given by its URL (``DOCKER_HOST``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_SCRIPT = REPO_ROOT / "scripts" / "build-base-image"
ECHO_DIR = Path(__file__).resolve().parents[1] / "images" / "echo"
ECHO_REPOSITORY = "codehub-test-echo"


class ImageBuildError(RuntimeError):
    """A build step failed; the message carries its output."""


def docker_env(docker_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DOCKER_HOST"] = docker_url
    env["DOCKER_BUILDKIT"] = "0"  # the classic builder: no buildx plugin on these machines
    return env


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ImageBuildError(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def image_exists(tag: str, docker_url: str) -> bool:
    proc = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", tag],
        env=docker_env(docker_url),
        capture_output=True,
        timeout=30,
    )
    return proc.returncode == 0


def ensure_base_image(docker_url: str) -> str:
    """Build the base image if its tag is missing; return the tag."""
    proc = _run(["bash", str(BASE_SCRIPT)], docker_env(docker_url), timeout=1800)
    lines = proc.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("codehub-base:"):
        raise ImageBuildError(f"build-base-image printed no tag: {proc.stdout!r}")
    return lines[-1]


def echo_image_tag(base_tag: str) -> str:
    digest = hashlib.sha256(base_tag.encode() + b"\0")
    for path in sorted(p for p in ECHO_DIR.rglob("*") if p.is_file()):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(ECHO_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return f"{ECHO_REPOSITORY}:{digest.hexdigest()[:12]}"


def ensure_echo_image(docker_url: str) -> str:
    """Build the echo workspace image (and the base under it) if missing; return its tag."""
    base_tag = ensure_base_image(docker_url)
    tag = echo_image_tag(base_tag)
    if image_exists(tag, docker_url):
        return tag
    env = docker_env(docker_url)
    lock_path = Path(tempfile.gettempdir()) / "codehub-echo-image.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image_exists(tag, docker_url):
            return tag
        with tempfile.TemporaryDirectory(prefix="codehub-echo-ctx-") as tmp:
            # The context is exactly the files the tag hashes (a copy, so no stray file of
            # the work tree can slip in).
            ctx = Path(tmp) / "ctx"
            shutil.copytree(ECHO_DIR, ctx, ignore=shutil.ignore_patterns("__pycache__"))
            _run(
                [
                    "docker",
                    "build",
                    "--quiet",
                    "--build-arg",
                    f"BASE={base_tag}",
                    "-t",
                    tag,
                    str(ctx),
                ],
                env,
                timeout=600,
            )
        _run(["docker", "tag", tag, f"{ECHO_REPOSITORY}:latest"], env, timeout=60)
    return tag
