"""A workspace's own home size (`home_size_limit_mib`, like the TTLs): through the API and
the CLI's parser, into the row, and from the row into the home the reconciler makes."""

from __future__ import annotations

import asyncio
import gzip
import io
import tarfile
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from apitools import auth, make_app
from reconciler_stack import Stack
from test_restore_hostile_archive import _add, _replace_archive, _to_cold

from codehub import client as cli_client
from codehub import keys
from codehub.model import DesiredState, Status
from codehub.store import Store

WS = "/api/v1/workspaces"


@pytest.fixture
async def api(database_url: str, aiohttp_client: Any) -> TestClient:
    return await aiohttp_client(await make_app(database_url))  # type: ignore[no-any-return]


async def call(api: TestClient, method: str, path: str, status: int,
               json: Any = None) -> Any:
    async with api.request(method, path, json=json, headers=auth()) as resp:
        body = await resp.json()
        assert resp.status == status, body
        return body


async def test_the_api_takes_a_home_size_shows_the_effective_one_and_null_resets_it(
        api: TestClient) -> None:
    default = api.app[keys.CONFIG].docker.home_size_limit_mib
    body = await call(api, "POST", WS, 201, {"id": "w", "owner": "o"})
    assert body["home_size_limit_mib"] == default
    body = await call(api, "POST", WS, 201, {"id": "v", "owner": "o",
                                             "home_size_limit_mib": 512})
    assert body["home_size_limit_mib"] == 512
    body = await call(api, "PATCH", f"{WS}/w", 200, {"home_size_limit_mib": 2048})
    assert body["home_size_limit_mib"] == 2048
    store: Store = api.app[keys.STORE]
    row = await store.get("w")
    assert row is not None and row.home_size_limit_mib == 2048
    body = await call(api, "PATCH", f"{WS}/w", 200, {"home_size_limit_mib": None})
    assert body["home_size_limit_mib"] == default
    assert (await store.get("w")).home_size_limit_mib is None  # type: ignore[union-attr]
    for bad in (0, 15, -1, "1G", 1 << 31):
        err = await call(api, "PATCH", f"{WS}/v", 400, {"home_size_limit_mib": bad})
        assert "home_size_limit_mib" in err["error"]["message"]


def test_the_cli_reads_home_sizes_in_mib_or_gib() -> None:
    assert cli_client.home_size("512") == 512
    assert cli_client.home_size("512M") == 512
    assert cli_client.home_size("10G") == 10240
    assert cli_client.home_size("default") is None
    with pytest.raises(ValueError):
        cli_client.home_size("10T")


async def test_a_workspaces_own_size_reaches_its_restore(stack: Stack) -> None:
    """No global limit in this stack: only the row's 1 MiB stops a 1.4 MB home."""
    await _to_cold(stack, "eps")
    big = io.BytesIO()
    with tarfile.open(fileobj=big, mode="w") as tf:
        _add(tf, "coder", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "coder/a.bin", data=bytes(1_400_000))
    await _replace_archive(stack, "eps", gzip.compress(big.getvalue()))
    async with stack.pool.acquire() as conn:
        await conn.execute("UPDATE workspaces SET home_size_limit_mib = 1 WHERE id = 'eps'")
    await stack.want("eps", DesiredState.WARM)
    async with asyncio.timeout(60):
        while (ws := await stack.store.get("eps")) is None or ws.status is not Status.ERROR:
            await asyncio.sleep(0.1)
    assert ws.error_message and "1048576 bytes" in ws.error_message
    # Raised again, the same archive restores.
    async with stack.pool.acquire() as conn:
        await conn.execute("UPDATE workspaces SET home_size_limit_mib = 16 WHERE id = 'eps'")
    back = await stack.store.compare_and_set(  # what POST .../retry writes
        "eps", expect_status=Status.ERROR, expect_operation=ws.operation,
        status=ws.error_from_status, error_from_status=None, error_count=0,
        error_message=None, error_at=None, next_retry_at=None)
    assert back is not None
    await stack.hints.publish("eps")
    await stack.wait_status("eps", Status.WARM)
