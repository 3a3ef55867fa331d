"""The single-container deployment: the Dockerfile builds here without a registry."""

from __future__ import annotations

import subprocess
from pathlib import Path

from harness.services import DockerEngine

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_builds_from_a_local_base_and_codehub_runs_inside(
        docker_engine: DockerEngine, docker_prefix: str) -> None:
    tag = f"codehub-gateway-{docker_prefix}:test"
    try:
        proc = subprocess.run([str(ROOT / "scripts" / "build-gateway-image"), tag],
                              capture_output=True, text=True, timeout=900,
                              env=docker_engine.env())
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proc.stdout.strip().splitlines()[-1] == tag
        out = subprocess.run(["docker", "run", "--rm", tag, "config", "show"],
                             capture_output=True, text=True, timeout=120,
                             env=docker_engine.env())
        assert out.returncode == 0, out.stderr
        assert '"data_dir": "/data"' in out.stdout and '"host": "0.0.0.0"' in out.stdout
        version = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python3", tag,
                                  "-c", "import codehub.app, uvloop, isal; "
                                  "from codehub.gateway.pages import PACKAGE_STATIC as s; "
                                  "assert (s / 'loading.html').is_file(); print('ok')"],
                                 capture_output=True, text=True, timeout=120,
                                 env=docker_engine.env())
        assert version.stdout.strip() == "ok", version.stderr
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=60,
                       env=docker_engine.env())
