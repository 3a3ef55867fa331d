"""The audit log (codehub/audit.py) through the real API on a real database, request ids,
and JSON log lines (codehub/logs.py)."""

from __future__ import annotations

import io
import logging
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from apitools import OTHER_TOKEN, TOKEN, auth, make_app, make_config

from codehub import audit, logs

Client = TestClient[web.Request, web.Application]
WS = "/api/v1/workspaces"
AUDIT = "/api/v1/audit"


@pytest.fixture
async def client(database_url: str, aiohttp_client: Any) -> Client:
    app = await make_app(database_url, make_config(tokens=(TOKEN, OTHER_TOKEN)))
    c: Client = await aiohttp_client(app)
    return c


async def entries(client: Client, **query: str) -> list[dict[str, Any]]:
    resp = await client.get(AUDIT, params=query, headers=auth())
    assert resp.status == 200, await resp.text()
    return list((await resp.json())["items"])


async def test_every_authenticated_call_is_recorded_with_actor_action_workspace_and_result(
        client: Client) -> None:
    r = await client.post(WS, json={"id": "aud-1", "owner": "ann"}, headers=auth())
    assert r.status == 201
    rid = r.headers["X-Request-Id"]
    assert (await client.patch(f"{WS}/aud-1", json={"desired_state": "WARM"},
                               headers=auth(OTHER_TOKEN))).status == 202
    assert (await client.post(WS, json={"id": "aud-1", "owner": "ann"},
                              headers=auth())).status == 409
    assert (await client.get(f"{WS}/nope-1", headers=auth())).status == 404
    assert (await client.post(f"{WS}/aud-1/access-links", headers=auth())).status == 201
    got = await entries(client)
    assert [(e["action"], e["workspace_id"], e["status"]) for e in got] == [
        ("createAccessLink", "aud-1", 201), ("getWorkspace", "nope-1", 404),
        ("createWorkspace", None, 409), ("updateWorkspace", "aud-1", 202),
        ("createWorkspace", "aud-1", 201)]
    first = got[-1]
    assert first["actor"] == audit.token_actor(TOKEN) != got[-2]["actor"]
    assert got[-2]["actor"] == audit.token_actor(OTHER_TOKEN)
    assert first["request_id"] == rid and first["at"]
    assert first["detail"] == {"id": "aud-1", "owner": "ann"}
    assert got[-2]["detail"] == {"desired_state": "WARM"}


async def test_no_secret_reaches_the_log_neither_the_token_nor_the_access_link(
        client: Client) -> None:
    await client.post(WS, json={"id": "aud-2", "owner": "ann"}, headers=auth())
    link = await (await client.post(f"{WS}/aud-2/access-links", headers=auth())).json()
    token = link["url"].split("access=")[1]
    raw = (await (await client.get(AUDIT, headers=auth())).read()).decode()
    assert TOKEN not in raw and token not in raw and "access=" not in raw


async def test_refused_calls_are_not_stored_so_strangers_cannot_fill_the_table(
        client: Client) -> None:
    for _ in range(5):
        assert (await client.post(WS, json={"owner": "x"},
                                  headers=auth("wrong-token"))).status == 401
    assert (await client.get(AUDIT)).status == 401
    assert await entries(client) == []


async def test_pages_newest_first_with_a_cursor_and_filters_by_workspace_and_actor(
        client: Client) -> None:
    for i in range(5):
        await client.post(WS, json={"id": f"aud-p{i}", "owner": "ann"},
                          headers=auth(TOKEN if i % 2 else OTHER_TOKEN))
    seen: list[int] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        body = await (await client.get(AUDIT, params=params, headers=auth())).json()
        seen += [e["id"] for e in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 5 and seen == sorted(seen, reverse=True)
    only = await entries(client, workspace_id="aud-p3")
    assert [e["workspace_id"] for e in only] == ["aud-p3"]
    mine = await entries(client, actor=audit.token_actor(TOKEN))
    assert {e["workspace_id"] for e in mine} == {"aud-p1", "aud-p3"}
    for bad in ({"cursor": "abc"}, {"cursor": "0"}, {"limit": "0"}, {"actor": "a b"}):
        r = await client.get(AUDIT, params=bad, headers=auth())
        assert r.status == 400 and "error" in await r.json()


async def test_a_well_formed_client_request_id_is_kept_and_a_hostile_one_replaced(
        client: Client) -> None:
    r = await client.get(f"{WS}/nope-2", headers={**auth(), "X-Request-Id": "abc-123.x"})
    assert r.headers["X-Request-Id"] == "abc-123.x"
    r = await client.get(f"{WS}/nope-2", headers={**auth(), "X-Request-Id": "a\"b{" * 3})
    new = r.headers["X-Request-Id"]
    assert new != "a\"b{" * 3 and len(new) == 16
    assert (await entries(client))[0]["request_id"] == new


def test_json_log_lines_parse_and_carry_the_request_context() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("codehub.test_json")
    log.addHandler(handler)
    log.propagate = False
    try:
        token = logs.REQUEST_ID.set("rid-1")
        logs.WORKSPACE_ID_VAR.set("ws-a")
        log.warning("two\nlines with %s", "an \"argument\"")
        logs.REQUEST_ID.reset(token)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    one, two = (orjson.loads(line) for line in lines)
    assert one["message"] == 'two\nlines with an "argument"' and one["level"] == "WARNING"
    assert one["request_id"] == "rid-1" and one["workspace_id"] == "ws-a"
    assert one["logger"] == "codehub.test_json" and one["time"].endswith("+00:00")
    assert "request_id" not in two and "ValueError: boom" in two["exc_info"]
