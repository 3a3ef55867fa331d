"""`codehub serve` and `codehub migrate` as a user runs them: real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from harness.services import free_port

from codehub import store


def codehub(*args: str, env: dict[str, str], **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "codehub.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)  # type: ignore[call-overload]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEHUB_")}
    env.update(extra)
    return env


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_ready(port: int, proc: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early:\n{proc.stdout.read()}")  # type: ignore[union-attr]
        try:
            if get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("serve did not become ready")


def postgres_processes(pgdata: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(str(pgdata) in part for part in cmd):
            found.append(p)
    return found


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "data"
    yield d
    for p in postgres_processes(d / "postgres"):  # never leak a server from a failed test
        p.kill()


def serve_and_stop(data_dir: Path) -> tuple[str, float]:
    port = free_port()
    env = base_env(CODEHUB_DATA_DIR=str(data_dir), CODEHUB_SERVER__PORT=str(port))
    proc = codehub("serve", env=env)
    try:
        wait_ready(port, proc)
        status, body = get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200, body
        status, body = get(f"http://127.0.0.1:{port}/readyz")
        assert status == 200 and b'"ready"' in body, body
        assert (data_dir / "postgres" / "PG_VERSION").exists()
        assert postgres_processes(data_dir / "postgres")
        children = psutil.Process(proc.pid).children(recursive=True)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read()  # type: ignore[union-attr]
    assert proc.returncode == 0, output
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not postgres_processes(data_dir / "postgres"), "embedded PostgreSQL left running"
    return output, elapsed


def test_serve_on_embedded_defaults_is_ready_and_stops_cleanly_on_sigterm(
        data_dir: Path) -> None:
    output, elapsed = serve_and_stop(data_dir)
    assert "embedded PostgreSQL created" in output
    assert "in-process hint bus" in output  # the embedded defaults are logged
    assert elapsed < 10
    version_file = (data_dir / "postgres" / "PG_VERSION").stat()

    output, elapsed = serve_and_stop(data_dir)
    assert "embedded PostgreSQL reused" in output
    assert (data_dir / "postgres" / "PG_VERSION").stat().st_mtime == version_file.st_mtime
    assert elapsed < 10


def test_serve_sigkilled_then_restarted_adopts_and_stops_the_orphaned_postgres(
        data_dir: Path) -> None:
    port = free_port()
    env = base_env(CODEHUB_DATA_DIR=str(data_dir), CODEHUB_SERVER__PORT=str(port))
    proc = codehub("serve", env=env)
    try:
        wait_ready(port, proc)
        orphans = postgres_processes(data_dir / "postgres")
        assert orphans
        proc.kill()  # no shutdown at all: the embedded server is orphaned
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [p for p in orphans if p.is_running()], "the server should outlive a SIGKILL"

    output, _ = serve_and_stop(data_dir)  # adopts the orphan, SIGTERM: nothing left
    assert "embedded PostgreSQL reused" in output
    assert "adopting the server of exited process(es)" in output, output
    assert not [p for p in orphans if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_unreachable_database_exits_3_with_one_line_after_retrying() -> None:
    port = free_port()  # nothing listens here
    env = base_env(CODEHUB_DATABASE__URL=f"postgresql://u:p@127.0.0.1:{port}/x",
                   CODEHUB_DATABASE__CONNECT_TIMEOUT="1.5", CODEHUB_LOG_LEVEL="ERROR")
    for command in ("serve", "migrate"):
        proc = codehub(command, env=env)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 3, out
        lines = out.strip().splitlines()
        assert len(lines) == 1, out
        assert f"database 127.0.0.1:{port}/x unreachable after" in lines[0]
        assert "attempt(s) in 1.5s" in lines[0]


def test_two_migrate_runs_at_once_both_succeed_with_one_schema(
        empty_database_url: str) -> None:
    database_url = empty_database_url
    env = base_env(CODEHUB_DATABASE__URL=database_url)
    procs = [codehub("migrate", env=env) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(f"schema at version {store.LATEST_VERSION}" in o for o in outs), outs
    applied_now = [o for o in outs if "applied now: none" not in o]
    assert len(applied_now) == 1, outs  # exactly one of them did the work

    import asyncio

    import asyncpg

    async def versions() -> list[int]:
        conn = await asyncpg.connect(database_url)
        try:
            return [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        finally:
            await conn.close()

    assert asyncio.run(versions()) == list(range(1, store.LATEST_VERSION + 1))
