"""The admin API with no token configured, against a web page in the user's own browser.

Guarantees of codehub/api.py (module docstring, "No token configured, also") pinned here on
a real PostgreSQL: a request addressed to a Host that is not a loopback name or address is
refused (403 forbidden_host: DNS rebinding), a request a browser says another origin sent
is refused (403 cross_site: CSRF), a body that is not application/json is refused (415),
on every authenticated route and method, and a refused request changes nothing in the
database. Loopback JSON requests and the CLI still work; with a token configured none of
these rules applies (bearer auth is the only rule, as before).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from apitools import LiveServer, auth, make_app, make_config

from codehub import api, cli, client, keys, signing
from codehub.model import DesiredState, Operation, Status

Client = TestClient[web.Request, web.Application]
WS = "/api/v1/workspaces"
EVIL = "https://evil.example"

# Every authenticated route, with a body each accepts (None: it takes none).
ROUTES = [("GET", WS, None), ("POST", WS, {"id": "new-1", "owner": "mallory"}),
          ("GET", f"{WS}/w", None), ("PATCH", f"{WS}/w", {"desired_state": "COLD"}),
          ("DELETE", f"{WS}/w", None), ("POST", f"{WS}/cold/restore", {"start": True}),
          ("POST", f"{WS}/bad/retry", None), ("POST", f"{WS}/w/access-links", {})]


async def _seed(app: web.Application) -> None:
    db = app[keys.STORE]
    await db.create(id="w", owner="o", image_ref="img:1")
    await db.create(id="cold", owner="o", image_ref="img:1", desired_state=DesiredState.COLD)
    await db.compare_and_set("cold", expect_status=Status.NEW, expect_operation=Operation.NONE,
                             status=Status.COLD, archive_key="cold/home.tar.gz")
    await db.create(id="bad", owner="o", image_ref="img:1")
    await db.compare_and_set("bad", expect_status=Status.NEW, expect_operation=Operation.NONE,
                             status=Status.ERROR, error_from_status=Status.NEW,
                             error_message="boom", error_count=8)


@pytest.fixture
async def tokenless(database_url: str, aiohttp_client: Any) -> Client:
    app = await make_app(database_url, make_config(tokens=()))
    await _seed(app)
    c: Client = await aiohttp_client(app)
    return c


@pytest.fixture
def minted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Ids of the workspaces an access link was minted for."""
    ids: list[str] = []
    real = signing.mint_access_link

    def spy(keys_: Any, workspace_id: str, *args: Any, **kw: Any) -> str:
        ids.append(workspace_id)
        return real(keys_, workspace_id, *args, **kw)

    monkeypatch.setattr(signing, "mint_access_link", spy)
    return ids


async def database(app: web.Application) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table: equal before and after means nothing was written."""
    async with app[keys.POOL].acquire() as conn:
        tables = [r["table_name"] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() ORDER BY table_name")]
        return {t: [tuple(r) for r in await conn.fetch(f'SELECT * FROM "{t}" ORDER BY 1')]
                for t in tables}


async def refused(c: Client, method: str, path: str, status: int, code: str,
                  **kw: Any) -> None:
    """The request gets `status` with a JSON error `code`, and the database is unchanged."""
    before = await database(c.app)
    resp = await c.request(method, path, **kw)
    body = await resp.json()
    assert resp.status == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code and body["error"]["message"], body
    assert await database(c.app) == before


def json_body(data: Any) -> dict[str, Any]:
    return {"data": orjson.dumps(data), "headers": {"Content-Type": "application/json"}}


# --- the attacks of issue #12 ------------------------------------------------------------


async def test_a_text_plain_post_from_another_site_creates_no_workspace(
        tokenless: Client) -> None:
    """The CSRF of the issue: a "simple" cross-site POST (no preflight) with a JSON text."""
    await refused(tokenless, "POST", WS, 403, "cross_site",
                  data=b'{"id": "evil-1", "owner": "mallory"}',
                  headers={"Content-Type": "text/plain", "Origin": EVIL})
    assert await tokenless.app[keys.STORE].get("evil-1") is None


async def test_an_access_link_cannot_be_minted_from_another_site(
        tokenless: Client, minted: list[str]) -> None:
    for headers in ({"Content-Type": "text/plain", "Origin": EVIL},
                    {"Origin": EVIL}, {"Sec-Fetch-Site": "cross-site"},
                    {"Content-Type": "application/json", "Origin": EVIL,
                     "Sec-Fetch-Site": "cross-site"}):
        await refused(tokenless, "POST", f"{WS}/w/access-links", 403, "cross_site",
                      data=b"{}", headers=headers)
    assert minted == []


@pytest.mark.parametrize("host", [
    "evil.example", "evil.example:8000", "127.0.0.1.nip.io", "127.0.0.1.nip.io:8000",
    "localhost.evil.example", "w.ws.localhost", "localhost.", "10.0.0.1", "0.0.0.0",
    "[::2]", "[fe80::1]:8000", "::1", "127.0.0.1:80x", "127.0.0.1:", "[::1]x", "[::1",
    "", "2130706433", "127.1",
])
async def test_a_request_addressed_to_a_non_loopback_host_is_refused(
        tokenless: Client, minted: list[str], host: str) -> None:
    """DNS rebinding: the page's own name, re-pointed at 127.0.0.1, arrives as its Host.
    Refused for reads (what rebinding is for) as well as writes, with no Origin at all."""
    await refused(tokenless, "GET", WS, 403, "forbidden_host", headers={"Host": host})
    await refused(tokenless, "POST", WS, 403, "forbidden_host", headers={"Host": host},
                  data=b'{"id": "evil-1", "owner": "mallory"}')
    await refused(tokenless, "POST", f"{WS}/w/access-links", 403, "forbidden_host",
                  headers={"Host": host, "Content-Type": "application/json"}, data=b"{}")
    assert minted == []


@pytest.mark.parametrize("site", ["cross-site", "same-site", "CROSS-SITE", "bogus",
                                  "same-origin"])
async def test_a_request_a_browser_says_another_site_sent_is_refused(
        tokenless: Client, site: str) -> None:
    """Sec-Fetch-Site other than none, even with an honest JSON body and no Origin
    (same-site: a sibling origin such as a workspace's; same-origin: in path mode, a
    workspace's own page)."""
    await refused(tokenless, "POST", WS, 403, "cross_site", headers={
        "Sec-Fetch-Site": site, "Content-Type": "application/json"},
        data=b'{"id": "evil-1", "owner": "mallory"}')


@pytest.mark.parametrize("origin", [
    EVIL, "null", "http://localhost:{port}", "https://127.0.0.1:{port}",
    "http://127.0.0.1:1", "http://127.0.0.1", "http://127.0.0.1:{port}/", "",
    "http://127.0.0.1:{port}",
])
async def test_a_request_any_web_page_sent_is_refused(
        tokenless: Client, origin: str) -> None:
    """Any Origin, the API's own included: in path mode that origin also serves every
    workspace's pages (the test client's Host is 127.0.0.1:port)."""
    await refused(tokenless, "POST", WS, 403, "cross_site", headers={
        "Origin": origin.format(port=tokenless.port), "Content-Type": "application/json"},
        data=b'{"id": "evil-1", "owner": "mallory"}')


@pytest.mark.parametrize("ctype", [
    "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "application/jsonx", "application/json-patch+json",
    "text/json", "",
])
async def test_a_body_that_is_not_application_json_is_refused_with_415(
        tokenless: Client, ctype: str) -> None:
    """What an HTML form or a no-preflight fetch can send, from a client that gives no
    Origin (an old browser, a plug-in): still refused, before the body is parsed."""
    await refused(tokenless, "POST", WS, 415, "unsupported_media_type",
                  data=b'{"id": "evil-1", "owner": "mallory"}',
                  headers={"Content-Type": ctype})


async def test_a_body_without_a_content_type_is_refused_with_415(tokenless: Client) -> None:
    body = b'{"id": "evil-1", "owner": "mallory"}'
    before = await database(tokenless.app)
    status, code = await raw_exchange(
        tokenless, f"POST {WS} HTTP/1.1\r\nHost: 127.0.0.1:{tokenless.port}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    assert (status, code) == (415, "unsupported_media_type")
    assert await database(tokenless.app) == before


async def raw_exchange(tokenless: Client, request: bytes) -> tuple[int, str]:
    """Send `request` as bytes (what aiohttp's client would not send); (status, error code)."""
    reader, writer = await asyncio.open_connection(tokenless.host, tokenless.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(payload)["error"]["code"]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_every_route_and_method_is_guarded_and_changes_nothing(
        tokenless: Client, minted: list[str], method: str, path: str, body: Any) -> None:
    """GET too: a cross-site page cannot read the answer anyway, but one rule for all."""
    data = {} if body is None else json_body(body)
    extra = data.pop("headers", {})
    for headers, status, code in (
            ({"Host": "evil.example"}, 403, "forbidden_host"),
            ({"Origin": EVIL}, 403, "cross_site"),
            ({"Sec-Fetch-Site": "cross-site"}, 403, "cross_site"),
            ({"Sec-Fetch-Site": "same-site"}, 403, "cross_site")):
        await refused(tokenless, method, path, status, code, headers={**extra, **headers},
                      **data)
    await refused(tokenless, method, path, 415, "unsupported_media_type",
                  headers={"Content-Type": "text/plain"},
                  data=orjson.dumps(body or {}))
    assert minted == []


async def test_a_request_without_a_host_is_refused(tokenless: Client) -> None:
    status, code = await raw_exchange(tokenless, f"GET {WS} HTTP/1.0\r\n\r\n".encode())
    assert (status, code) == (403, "forbidden_host")


# --- what still works --------------------------------------------------------------------


@pytest.mark.parametrize("host", [
    "localhost", "localhost:8000", "LocalHost:1", "127.0.0.1", "127.0.0.1:8000",
    "127.1.2.3:65535", "[::1]", "[::1]:8000", "[0:0:0:0:0:0:0:1]:8000",
])
async def test_loopback_hosts_are_answered(tokenless: Client, host: str) -> None:
    resp = await tokenless.get(WS, headers={"Host": host})
    assert resp.status == 200, await resp.text()
    resp = await tokenless.post(WS, headers={"Host": host}, json={"owner": "alice"})
    assert resp.status == 201, await resp.text()


async def test_loopback_json_requests_are_answered(tokenless: Client) -> None:
    """As a script, curl or the user's own browser tab (a typed URL) sends them."""
    c = tokenless
    resp = await c.post(WS, json={"id": "a-1", "owner": "alice"})
    assert resp.status == 201, await resp.text()
    resp = await c.post(WS, data=b'{"id": "a-2", "owner": "alice"}',
                        headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert resp.status == 201, await resp.text()
    resp = await c.get(f"{WS}/a-1", headers={"Sec-Fetch-Site": "none"})
    assert resp.status == 200 and (await resp.json())["owner"] == "alice"
    resp = await c.patch(f"{WS}/a-1", json={"warm_ttl_seconds": 60})
    assert resp.status == 200, await resp.text()
    resp = await c.post(f"{WS}/a-1/access-links", json={"ttl_seconds": 60})
    assert resp.status == 201 and "url" in await resp.json()


async def test_bodyless_requests_without_a_content_type_are_answered(
        tokenless: Client) -> None:
    """What the CLI (urllib) and curl send for retry, delete and an option-less restore:
    no body, no Content-Type. (aiohttp's client would add application/octet-stream.)"""
    c, bare = tokenless, {"skip_auto_headers": ["Content-Type"]}
    resp = await c.post(f"{WS}/cold/restore", **bare)
    assert resp.status == 202, await resp.text()
    resp = await c.post(f"{WS}/bad/retry", **bare)
    assert resp.status == 202, await resp.text()
    resp = await c.post(f"{WS}/w/access-links", **bare)
    assert resp.status == 201, await resp.text()
    resp = await c.delete(f"{WS}/w", **bare)
    assert resp.status == 202, await resp.text()


@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded", "text/plain",
                                   "application/octet-stream"])
async def test_a_declared_type_other_than_json_is_refused_even_with_an_empty_body(
        tokenless: Client, minted: list[str], ctype: str) -> None:
    """An HTML form always declares a type, even when empty: so a bodyless restore, retry
    or link is refused to a form even from a browser that sends no Origin/Sec-Fetch-Site."""
    for path in (f"{WS}/cold/restore", f"{WS}/bad/retry", f"{WS}/w/access-links"):
        await refused(tokenless, "POST", path, 415, "unsupported_media_type", data=b"",
                      headers={"Content-Type": ctype})
    assert minted == []


@pytest.fixture
def live_tokenless(database_url: str, monkeypatch: pytest.MonkeyPatch
                   ) -> Iterator[LiveServer]:
    with LiveServer(database_url, make_config(tokens=())) as server:
        assert server.app is not None
        server.run(_seed(server.app))
        for name in list(os.environ):
            if name.startswith("CODEHUB_") and not name.startswith("CODEHUB_TEST_"):
                monkeypatch.delenv(name)
        monkeypatch.setenv(client.ENV_URL, server.url)
        yield server


def test_the_cli_works_without_a_token(live_tokenless: LiveServer,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Every CLI action on the tour (and the rest), against a token-less API."""
    def run(*argv: str) -> Any:
        code = cli.main(["workspace", *argv, "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        return orjson.loads(out)

    assert run("create", "alice-1", "--owner", "alice", "--warm-ttl", "30s",
               "--cold-ttl", "60s")["id"] == "alice-1"
    assert run("show", "alice-1")["status"] == "NEW"
    assert {w["id"] for w in run("list")} >= {"alice-1", "w", "cold", "bad"}
    assert run("set", "alice-1", "--desired", "WARM")["desired_state"] == "WARM"
    assert run("link", "alice-1")["url"].startswith(live_tokenless.url + "/w/alice-1/")
    assert run("restore", "cold", "--start")["desired_state"] == "RUNNING"
    assert run("retry", "bad")["status"] == "NEW"
    assert run("delete", "alice-1")["desired_state"] == "DELETED"


# --- with a token: bearer only, as before ------------------------------------------------


async def test_with_a_token_the_bearer_is_the_only_rule(
        database_url: str, aiohttp_client: Any) -> None:
    """No Host, Origin, Sec-Fetch-Site or Content-Type rule: a browser never attaches the
    token by itself, so a request that carries it is the operator's (bodies are parsed as
    JSON whatever their declared type, as before)."""
    app = await make_app(database_url, make_config())
    c: Client = await aiohttp_client(app)
    browserish = {"Host": "evil.example", "Origin": EVIL, "Sec-Fetch-Site": "cross-site",
                  "Content-Type": "text/plain"}
    resp = await c.post(WS, data=b'{"id": "t-1", "owner": "o"}',
                        headers={**browserish, **auth()})
    assert resp.status == 201, await resp.text()
    resp = await c.post(WS, data=b'{"id": "t-2", "owner": "o"}', headers=browserish)
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    assert await app[keys.STORE].get("t-2") is None


# --- what the operator and the document are told -----------------------------------------


async def test_the_start_up_log_states_the_no_token_rules(
        database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "codehub.api")
    await make_app(database_url, make_config(tokens=()))
    line = next(r.getMessage() for r in caplog.records if "no auth.admin_tokens" in
                r.getMessage())
    for rule in ("loopback Host", "forbidden_host", "cross_site", "Origin",
                 "Sec-Fetch-Site", "JSON", "415", "CSRF", "DNS rebinding"):
        assert rule in line, rule


def test_the_document_lists_403_and_415_on_every_authenticated_operation() -> None:
    doc = api.build_document()
    ops = [(path, method, op) for path, item in doc["paths"].items()
           for method, op in item.items()]
    assert ops
    for path, method, op in ops:
        authenticated = op["security"] != []
        for status in ("403", "415"):
            assert (status in op["responses"]) is authenticated, (method, path, status)
            if authenticated:
                ref = op["responses"][status]["content"]["application/json"]["schema"]
                assert ref == {"$ref": "#/components/schemas/Error"}
    assert "forbidden_host" in doc["paths"][api.PREFIX + "/workspaces"]["post"][
        "responses"]["403"]["description"]


def test_loopback_host_header_parsing() -> None:
    ok = ["localhost", "LOCALHOST:80", "127.0.0.1", "127.255.255.254:1", "[::1]",
          "[::1]:65535", " localhost "]
    bad = ["", "localhost.", "a.localhost", "localhost:", "localhost:x", "localhost:123456",
           "::1", "[::1]:", "[::1]:x", "[::1", "::1]", "[127.0.0.1]", "127.0.0.1.nip.io",
           "1.127.0.0.1", "128.0.0.1", "[::2]", "127.0.0.1:80:80", "[::1]]"]
    assert [h for h in ok if not api.is_loopback_host_header(h)] == []
    assert [h for h in bad if api.is_loopback_host_header(h)] == []
