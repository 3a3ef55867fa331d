"""Real services for the whole test session and a clean slice of each for every test.

Fixture contract (other tests are written against these names and shapes):

session scope, each started on first use and stopped at the end of the session:
- ``pg_server``: ``.dsn`` is a superuser DSN of database ``postgres``.
- ``redis_server``: ``.url``, ``.stop(kill=False)``, ``.start()`` (same URL after a
  restart, no data kept), ``.restartable`` (False for CODEHUB_TEST_REDIS_URL).
- ``s3_server``: ``.endpoint_url`` (plus ``.region``, ``.access_key_id``,
  ``.secret_access_key``).
- ``docker_engine``: ``.url`` such as ``unix:///var/run/docker.sock``; left running.
- ``workspace_image``: tag of the echo workspace image (tests/images/echo/server.py).

function scope, a fresh clean state per test:
- ``database_url``: DSN of a brand-new database already at the latest schema (a copy of a
  template migrated once per session, so ``store.migrate`` on it applies nothing), dropped
  WITH (FORCE) afterwards.
- ``empty_database_url``: the same, but an empty database (for tests of migrations).
- ``redis_url``: the Redis URL right after FLUSHALL (Redis restarted first if a test
  stopped it, and again afterwards if the test left it stopped).
- ``s3_settings``: ``dict(endpoint_url, region="us-east-1", access_key_id, secret_access_key,
  bucket)``; the bucket name is unique and the bucket NOT created; afterwards the bucket,
  if it exists, is emptied and deleted.
- ``docker_prefix``: a unique short name fragment (``t`` + 7 hex); afterwards every
  container, network and volume whose name contains it is force-removed.

Session fixtures are plain sync fixtures (processes, not coroutines), so they work with
any pytest-asyncio loop scope. Where each service comes from is in the report header;
what was started, on which port and how fast, in the terminal summary.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiodocker
import pytest

# The harness is imported as the top-level package ``harness`` whether or not tests/ is a
# package itself.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

# Fixtures shared by the reconciler tests (a whole reconciler on real services) and the
# storage tests (volumes, object stores).
pytest_plugins = ["reconciler_stack", "storage_support"]

from harness import images, services  # noqa: E402


def pytest_report_header(config: pytest.Config) -> str:
    return services.plan_summary()


# Tests that take tens of seconds (mostly waiting: TTLs, 60 s outages, big volumes, real
# code-server). The suite runs in parallel workers (scripts/test); handing these out first
# lets the short tests fill in around them instead of leaving them as the run's tail.
LONG_FIRST = (
    "tests/gateway/test_gateway_idle_browser.py",
    "tests/gateway/test_gateway_faults.py",
    "tests/test_storage_volumes.py::test_archiving_and_restoring_a_2gb",
    "tests/gateway/test_gateway_tunnel.py::test_a_1_gib_message",
    "tests/test_isolation.py",
    "tests/test_storage_volumes.py::test_round_trip",
    "tests/test_gateway_image.py",
    "tests/gateway/test_gateway_code_server",
    "tests/test_dockerd_restart.py",
    "tests/test_reconciler_chaos.py",
    "tests/gateway/test_gateway_tunnel.py::test_idle_relayed_sockets",
    "tests/test_serve.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The LONG_FIRST tests first, each group in its collection order."""
    def rank(item: pytest.Item) -> int:
        for i, prefix in enumerate(LONG_FIRST):
            if item.nodeid.startswith(prefix):
                return i
        return len(LONG_FIRST)
    items.sort(key=rank)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = services.obtained_summary()
    if lines:
        terminalreporter.write_sep("-", "codehub test services")
        for line in lines:
            terminalreporter.write_line(line)


# --- session: the services themselves -------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[services.PostgresServer]:
    server = services.start_postgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[services.RedisServer]:
    server = services.start_redis()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[services.S3Server]:
    server = services.start_s3()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def docker_engine() -> services.DockerEngine:
    return services.connect_docker()


@pytest.fixture(scope="session")
def workspace_image(docker_engine: services.DockerEngine) -> str:
    return images.ensure_echo_image(docker_engine.url)


# --- function: clean state per test ---------------------------------------------------------


@pytest.fixture(scope="session")
def migrated_template(pg_server: services.PostgresServer) -> Iterator[str]:
    """Name of a database migrated once for the session; each test gets a copy of it."""
    name = f"codehub_template_{uuid.uuid4().hex[:16]}"
    services.create_migrated_template(pg_server.dsn, name)
    try:
        yield name
    finally:
        services.drop_database(pg_server.dsn, name)


@pytest.fixture
def database_url(pg_server: services.PostgresServer, migrated_template: str) -> Iterator[str]:
    with services.fresh_database(pg_server.dsn, template=migrated_template) as dsn:
        yield dsn


@pytest.fixture
def empty_database_url(pg_server: services.PostgresServer) -> Iterator[str]:
    with services.fresh_database(pg_server.dsn) as dsn:
        yield dsn


@pytest.fixture
def redis_url(redis_server: services.RedisServer) -> Iterator[str]:
    if redis_server.restartable:
        redis_server.start()  # no-op when it runs
    services.redis_flushall(redis_server.url)
    try:
        yield redis_server.url
    finally:
        if redis_server.restartable:
            redis_server.start()


@pytest.fixture
def s3_settings(s3_server: services.S3Server) -> Iterator[dict[str, str]]:
    with services.fresh_bucket(s3_server) as settings:
        yield settings


@pytest.fixture
def docker_prefix(docker_engine: services.DockerEngine) -> Iterator[str]:
    with services.fresh_docker_prefix(docker_engine.url) as prefix:
        yield prefix


@pytest.fixture
async def docker(docker_engine: services.DockerEngine) -> AsyncIterator[aiodocker.Docker]:
    """An aiodocker client of the test engine, closed after the test."""
    client = aiodocker.Docker(url=docker_engine.url)
    try:
        yield client
    finally:
        await client.close()
