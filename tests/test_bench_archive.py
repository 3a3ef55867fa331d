"""bench/archive.py keeps working: a tiny run against the real engine prints both ratios and
removes everything it made (volumes, helpers, the restore network). It asserts nothing
about speed (the figures live in README)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness.services import DockerEngine

ROOT = Path(__file__).resolve().parent.parent


def test_archive_bench_prints_both_ratios_and_leaves_nothing_behind(
        docker_engine: DockerEngine, workspace_image: str, tmp_path: Path) -> None:
    if os.geteuid() != 0 or not docker_engine.url.startswith("unix://"):
        pytest.skip("the benchmark writes into a volume's Mountpoint: root on the Docker host")
    before = _bench_leftovers(docker_engine)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "archive.py"), "--size-mb", "8", "--repeat", "2",
         "--image", workspace_image, "--docker-url", docker_engine.url,
         "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    for name in ("archive", "restore"):
        line = next(line for line in lines if line.startswith(f"{name}:"))
        assert "ratio" in line and "median of pairs" in line, line
    assert _bench_leftovers(docker_engine) == before
    assert list(tmp_path.iterdir()) == []


def _bench_leftovers(engine: DockerEngine) -> list[str]:
    """The benchmark's volumes, containers and networks on the engine."""
    found = []
    for kind in ("volume", "container", "network"):
        out = subprocess.run(
            ["docker", kind, "ls", *(["-a"] if kind == "container" else []),
             "--filter", "name=codehub-bench-", "--format", "{{.Name}}" if kind != "container"
             else "{{.Names}}"],
            capture_output=True, text=True, timeout=60, env=engine.env(), check=True)
        found += [f"{kind}:{name}" for name in out.stdout.split()]
    return sorted(found)
