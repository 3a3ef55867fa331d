"""The test harness keeps its promises: real services, clean state per test, cached images.

Each test is named after the guarantee it pins (see tests/conftest.py and tests/harness/).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
import yarl
from botocore.exceptions import ClientError
from harness import images, services

from codehub import store

PATTERN = bytes(range(256))

def expected_download(size: int) -> bytes:
    return (PATTERN * (size // 256 + 1))[:size]


def docker(engine: services.DockerEngine, *args: str) -> str:
    proc = subprocess.run(
        ["docker", *args],
        env=engine.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr}"
    return proc.stdout.strip()


def wait_for_healthz(base_url: str, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


@pytest.fixture
def echo_url(
    docker_engine: services.DockerEngine, workspace_image: str, docker_prefix: str
) -> Iterator[str]:
    """A running echo workspace on the default bridge, reached at its container IP:8080."""
    name = f"{docker_prefix}-echo"
    docker(
        docker_engine,
        "run",
        "-d",
        "--rm",
        "--name",
        name,
        workspace_image,
        "--auth",
        "none",
        "--bind-addr",
        "0.0.0.0:8080",
        "/home/coder",
    )
    ip = docker(
        docker_engine,
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        name,
    )
    assert ip, "container has no IP on the bridge"
    base_url = f"http://{ip}:8080"
    wait_for_healthz(base_url)
    yield base_url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


# --- images ---------------------------------------------------------------------------------


async def test_echo_image_honours_code_server_contract(
    echo_url: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{echo_url}/healthz") as resp:
        assert resp.status == 200
        health = await resp.json()
    assert health["status"] == "alive"
    assert abs(health["lastHeartbeat"] - time.time() * 1000) < 120_000

    async with http.get(f"{echo_url}/_echo/info") as resp:
        info = await resp.json()
    assert info["uid"] == 1000 and info["gid"] == 1000
    assert info["home"] == "/home/coder" and info["cwd"] == "/home/coder"
    assert info["argv"][1:] == ["--auth", "none", "--bind-addr", "0.0.0.0:8080", "/home/coder"]

    body = os.urandom(300_000)
    async with http.post(f"{echo_url}/some/path?a=1", data=body, headers={"X-Test": "1"}) as resp:
        echo = await resp.json()
    assert echo["method"] == "POST" and echo["path"] == "/some/path"
    assert echo["query_string"] == "a=1" and echo["raw_path"] == "/some/path?a=1"
    assert ["X-Test", "1"] in echo["headers"]
    assert echo["body_len"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()

    async with http.get(f"{echo_url}/_echo/download", params={"size": "1000000"}) as resp:
        assert resp.headers["Content-Length"] == "1000000"
        assert await resp.read() == expected_download(1_000_000)

    async with http.ws_connect(f"{echo_url}/_echo/ws", max_msg_size=0) as ws:
        await ws.send_str("hello")
        assert (await ws.receive_str(timeout=10)) == "hello"
        await ws.send_bytes(b"\x00\xffbinary")
        assert (await ws.receive_bytes(timeout=10)) == b"\x00\xffbinary"


async def test_echo_server_behaves_as_documented(
    echo_url: str, http: aiohttp.ClientSession
) -> None:
    for code in (204, 304, 418, 503):
        async with http.get(f"{echo_url}/_echo/status/{code}") as resp:
            assert resp.status == code
            assert (await resp.read()) == (b"" if code in (204, 304) else b'{"status":%d}' % code)

    query = [("set-cookie", "a=1"), ("set-cookie", "b=2"), ("x-custom", "v")]
    async with http.get(f"{echo_url}/_echo/headers", params=query) as resp:
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert resp.headers["X-Custom"] == "v"

    async with http.get(f"{echo_url}/_echo/download?size=70000&chunked=1") as resp:
        assert "Content-Length" not in resp.headers
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert await resp.read() == expected_download(70_000)

    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(f"{echo_url}/_echo/close-early") as resp:
            await resp.read()

    began = time.monotonic()
    async with http.get(f"{echo_url}/_echo/slow?seconds=0.3") as resp:
        assert (await resp.json()) == {"slept": 0.3}
    assert time.monotonic() - began >= 0.3

    # A 100 MB chunked upload is hashed as it streams, never held in memory.
    digest, total = hashlib.sha256(), 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal total
        block = os.urandom(1 << 20)
        for _ in range(100):
            digest.update(block)
            total += len(block)
            yield block

    async with http.put(f"{echo_url}/upload", data=chunks()) as resp:
        echo = await resp.json()
    assert ["Transfer-Encoding", "chunked"] in echo["headers"]
    assert echo["body_len"] == total and echo["body_sha256"] == digest.hexdigest()
    async with http.get(f"{echo_url}/_echo/info") as resp:
        assert (await resp.json())["max_rss_kb"] < 64 * 1024


async def test_echo_websocket_echoes_any_size_and_propagates_close_codes(
    echo_url: str, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(
        f"{echo_url}/any/path",
        protocols=("first", "second"),
        max_msg_size=0,
        headers={"X-Upgrade-Test": "yes"},
    ) as ws:
        assert ws.protocol == "first"
        big = os.urandom(17 * 1024 * 1024)
        await ws.send_bytes(big)
        assert (await ws.receive_bytes(timeout=60)) == big
        await ws.send_str("headers")
        headers = json.loads(await ws.receive_str(timeout=10))
        assert ["X-Upgrade-Test", "yes"] in headers
        await ws.ping(b"p")
        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4001

    async with http.ws_connect(f"{echo_url}/_echo/ws") as ws:
        await ws.close(code=4321)
        assert ws.close_code == 4321  # the code the server answered with


WRITE_FILE = "import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.parent.mkdir(parents=True, \
exist_ok=True); p.write_text(sys.argv[2])"


async def test_echo_serves_home_files_with_asked_headers_and_logs_every_request(
    echo_url: str, http: aiohttp.ClientSession, docker_engine: services.DockerEngine,
    docker_prefix: str,
) -> None:
    name = f"{docker_prefix}-echo"
    for path, text in (("/home/coder/site/page.html", "<p>hi</p>"),
                       ("/home/coder/site/sw.js", "self.x = 1;"),
                       ("/tmp/outside.txt", "secret")):
        docker(docker_engine, "exec", name, "python3", "-c", WRITE_FILE, path, text)
    docker(docker_engine, "exec", name, "ln", "-s", "/tmp/outside.txt", "/home/coder/link")

    async with http.get(f"{echo_url}/_echo/home/site/page.html") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        assert await resp.text() == "<p>hi</p>"
    async with http.get(f"{echo_url}/_echo/home/site/sw.js",
                        params=[("Service-Worker-Allowed", "/"), ("X-A", "1"),
                                ("content-length", "1")]) as resp:
        assert resp.status == 200 and "javascript" in resp.content_type
        assert resp.headers["Service-Worker-Allowed"] == "/" and resp.headers["X-A"] == "1"
        assert await resp.text() == "self.x = 1;"  # framing headers are not taken from the query
    async with http.get(f"{echo_url}/_echo/home/site/page.html?content-type=text/plain") as resp:
        assert resp.content_type == "text/plain"
    async with http.head(f"{echo_url}/_echo/home/site/page.html") as resp:
        assert resp.status == 200 and resp.headers["Content-Length"] == "9"
    # (dot segments percent-encoded, so that the client sends them as they are)
    for bad in ("missing.txt", "site", "site/%2E%2E/site/page.html", "site//page.html",
                "%2Ftmp/outside.txt", "link", "", "%2E/site/page.html"):
        async with http.get(yarl.URL(f"{echo_url}/_echo/home/{bad}", encoded=True)) as resp:
            assert resp.status == 404, bad
            assert await resp.json() == {"error": "not found"}

    # The log: every request but /healthz and /_echo/requests, upgrades included.
    async with http.post(f"{echo_url}/logged/post?x=1", data=b"body"):
        pass
    async with http.ws_connect(f"{echo_url}/_echo/ws?log=1") as ws:
        await ws.close()
    async with http.get(f"{echo_url}/healthz"):
        pass
    async with http.get(f"{echo_url}/_echo/requests") as resp:
        logged = (await resp.json())["requests"]
    assert logged[-2:] == [["POST", "/logged/post?x=1"], ["GET", "/_echo/ws?log=1"]]
    assert ["GET", "/_echo/home/site/page.html"] in logged
    assert not any(path.startswith(("/healthz", "/_echo/requests")) for _m, path in logged)


async def test_cached_images_are_reused_without_a_build(
    docker_engine: services.DockerEngine, workspace_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def identity(tag: str) -> str:
        return docker(docker_engine, "image", "inspect", "--format", "{{.Id}} {{.Created}}", tag)

    base_tag = images.ensure_base_image(docker_engine.url)
    before = identity(base_tag), identity(workspace_image)
    commands: list[list[str]] = []
    real_run = images._run

    def recording_run(args: list[str], env: dict[str, str], timeout: float) -> Any:
        commands.append(args)
        return real_run(args, env, timeout)

    monkeypatch.setattr(images, "_run", recording_run)
    began = time.monotonic()
    tag = await asyncio.to_thread(images.ensure_echo_image, docker_engine.url)
    elapsed = time.monotonic() - began
    print(f"cached image lookup took {elapsed:.2f} s")  # the figure; no bound on a busy host
    assert tag == workspace_image
    assert [c for c in commands if c[:2] == ["docker", "build"]] == [], commands
    assert (identity(base_tag), identity(workspace_image)) == before  # nothing rebuilt


def test_image_tags_change_with_their_inputs() -> None:
    assert images.echo_image_tag("codehub-base:aaa") != images.echo_image_tag("codehub-base:bbb")
    assert images.echo_image_tag("codehub-base:aaa").startswith("codehub-test-echo:")


# --- PostgreSQL -----------------------------------------------------------------------------


async def _user_tables(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return sorted(r[0] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"))
    finally:
        await conn.close()


async def _database_exists(server_dsn: str, dsn: str) -> bool:
    conn = await asyncpg.connect(server_dsn)
    try:
        name = dsn.rsplit("/", 1)[-1]
        return bool(await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


async def test_the_database_fixture_is_migrated_and_holds_no_rows(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await store.schema_version(conn) == store.LATEST_VERSION
        assert await conn.fetchval("SELECT count(*) FROM workspaces") == 0
        assert await store.migrate(conn) == []  # nothing left to apply
    finally:
        await conn.close()


async def test_the_empty_database_fixture_has_no_tables(empty_database_url: str) -> None:
    assert await _user_tables(empty_database_url) == []


async def test_each_database_is_a_fresh_copy_and_is_dropped_after_its_block(
    pg_server: services.PostgresServer, migrated_template: str
) -> None:
    """What the database fixtures do (conftest: one `fresh_database` block per test): a
    table left by one test is not in the next one's copy, and its database is gone."""
    migrated = await _user_tables(services.database_dsn(pg_server.dsn, migrated_template))
    assert "workspaces" in migrated
    for template, expected in ((migrated_template, migrated), (None, [])):
        first = await asyncio.to_thread(_leave_a_table_behind, pg_server.dsn, template)
        assert not await _database_exists(pg_server.dsn, first), "first database not dropped"
        with services.fresh_database(pg_server.dsn, template=template) as second:
            assert second != first
            assert await _user_tables(second) == expected


def _leave_a_table_behind(server_dsn: str, template: str | None) -> str:
    async def leave(dsn: str) -> None:
        conn = await asyncpg.connect(dsn)
        await conn.execute("CREATE TABLE leftover (id int)")
        await conn.execute("INSERT INTO leftover VALUES (1)")
        # left connected on purpose: the drop is WITH (FORCE)

    with services.fresh_database(server_dsn, template=template) as dsn:
        services.run_async(lambda: leave(dsn))
        return dsn


async def test_embedded_postgres_is_tuned_for_tests(pg_server: services.PostgresServer) -> None:
    if os.environ.get("CODEHUB_TEST_DATABASE_URL"):
        pytest.skip("PostgreSQL comes from CODEHUB_TEST_DATABASE_URL")
    conn = await asyncpg.connect(pg_server.dsn)
    try:
        settings = {
            key: await conn.fetchval(f"SHOW {key}")
            for key in ("fsync", "synchronous_commit", "full_page_writes", "max_connections")
        }
        user = await conn.fetchval("SELECT current_user")
    finally:
        await conn.close()
    assert settings == {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "300",
    }
    assert user == "postgres"


# --- Redis ----------------------------------------------------------------------------------


async def test_redis_can_be_restarted_on_same_url(
    redis_url: str, redis_server: services.RedisServer
) -> None:
    if not redis_server.restartable:
        pytest.skip("Redis comes from CODEHUB_TEST_REDIS_URL")
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set("k", "v")
        await asyncio.to_thread(redis_server.stop, kill=True)
        with pytest.raises(aioredis.ConnectionError):
            await client.ping()
        await asyncio.to_thread(redis_server.start)
        assert await client.ping()
        assert await client.get("k") is None  # nothing persisted across the restart
    finally:
        await client.aclose()
    assert redis_server.url == redis_url


@pytest.mark.parametrize("run", ["first", "second"])
async def test_redis_is_flushed_for_each_test(run: str, redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.dbsize() == 0
        await client.set(f"leftover-{run}", "1")
    finally:
        await client.aclose()


# --- S3 -------------------------------------------------------------------------------------


def test_s3_bucket_is_unique_per_test_and_removed_after_it(
    s3_server: services.S3Server, s3_settings: dict[str, str]
) -> None:
    assert s3_settings["region"] == "us-east-1"
    client = services.s3_client(
        s3_settings["endpoint_url"],
        s3_settings["access_key_id"],
        s3_settings["secret_access_key"],
        s3_settings["region"],
    )
    try:
        with pytest.raises(ClientError):
            client.head_bucket(Bucket=s3_settings["bucket"])  # not created for us
        # what the fixture does (conftest: one `fresh_bucket` block per test)
        with services.fresh_bucket(s3_server) as first:
            assert first["bucket"] != s3_settings["bucket"]
            client.create_bucket(Bucket=first["bucket"])
            client.put_object(Bucket=first["bucket"], Key="a/b.txt", Body=b"hello")
        with pytest.raises(ClientError):
            client.head_bucket(Bucket=first["bucket"])  # removed after its block
    finally:
        client.close()


# --- Docker ---------------------------------------------------------------------------------


def test_docker_things_named_with_the_prefix_are_removed_after_the_test(
    docker_prefix: str, docker_engine: services.DockerEngine, workspace_image: str
) -> None:
    assert docker_prefix.startswith("t") and len(docker_prefix) == 8
    # what the fixture does (conftest: one `fresh_docker_prefix` block per test)
    with services.fresh_docker_prefix(docker_engine.url) as prefix:
        assert prefix != docker_prefix and prefix.startswith("t") and len(prefix) == 8
        docker(docker_engine, "volume", "create", f"vol-{prefix}")
        docker(docker_engine, "network", "create", f"{prefix}-net")
        docker(docker_engine, "create", "--name", f"ws-{prefix}-c", workspace_image)
    left = services.docker_remove_named(docker_engine.url, prefix)
    assert left == [], f"left behind after its block: {left}"
