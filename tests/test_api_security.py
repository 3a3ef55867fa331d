"""The admin API's guard: tokens, the no-token mode, and hostile input.

Guarantees pinned here: requests without a valid bearer token are refused (401) before
anything else is looked at; the token is compared with hmac.compare_digest against every
configured token without an early exit; with no token configured the API refuses to be
built on a non-loopback listener and otherwise answers only direct loopback clients; ids,
bodies and query strings crafted to escape (../, NUL, very long, unicode, broken UTF-8,
deep nesting) end in a clean JSON 4xx, never a 5xx.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import sys
import types
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from apitools import OTHER_TOKEN, TOKEN, auth, make_app, make_config
from yarl import URL

from codehub import api
from codehub.config import ConfigError

Client = TestClient[web.Request, web.Application]
WS = "/api/v1/workspaces"

ENDPOINTS = [("GET", WS), ("POST", WS), ("GET", f"{WS}/w"), ("PATCH", f"{WS}/w"),
             ("DELETE", f"{WS}/w"), ("POST", f"{WS}/w/restore"), ("POST", f"{WS}/w/retry"),
             ("POST", f"{WS}/w/access-links")]


@pytest.fixture
async def client(database_url: str, aiohttp_client: Any) -> Client:
    app = await make_app(database_url, make_config(tokens=(TOKEN, OTHER_TOKEN)))
    c: Client = await aiohttp_client(app)
    await c.post(WS, json={"id": "w", "owner": "o"}, headers=auth())
    return c


async def _refused(resp: Any, status: int, code: str) -> None:
    body = await resp.json()
    assert resp.status == status, body
    assert body["error"]["code"] == code


# --- tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_every_endpoint_refuses_a_request_without_a_token(
        client: Client, method: str, path: str) -> None:
    resp = await client.request(method, path, json={"owner": "o"})
    await _refused(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", [
    f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", "Bearer", f"Basic {TOKEN}",
    TOKEN, f"Bearer {TOKEN.upper()}", "Bearer \u00e9\u00e9", f"Bearer  {OTHER_TOKEN}x",
])
async def test_a_wrong_or_malformed_token_is_401(client: Client, header: str) -> None:
    resp = await client.get(WS, headers={"Authorization": header})
    await _refused(resp, 401, "unauthorized")


async def test_auth_is_checked_before_the_request_is_looked_at(client: Client) -> None:
    """No validation error, 404 or 409 leaks to a caller without a valid token."""
    for method, path in [("GET", f"{WS}/nobody"), ("GET", f"{WS}/Bad..Id"),
                         ("POST", f"{WS}/w/restore"), ("GET", f"{WS}?limit=0")]:
        resp = await client.request(method, path, headers={"Authorization": "Bearer no"})
        await _refused(resp, 401, "unauthorized")


async def test_every_configured_token_is_accepted_scheme_case_insensitively(
        client: Client) -> None:
    for header in (f"Bearer {TOKEN}", f"bearer {OTHER_TOKEN}", f"BEARER {TOKEN}"):
        resp = await client.get(WS, headers={"Authorization": header})
        assert resp.status == 200


@pytest.mark.parametrize("presented", [TOKEN, OTHER_TOKEN, "wrong", ""])
async def test_the_token_is_compared_in_constant_time_against_every_token(
        monkeypatch: pytest.MonkeyPatch, presented: str) -> None:
    """compare_digest runs once per configured token whatever matched (no early exit), on
    equal-length digests, so neither which token matched nor how much of one did shows."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    digests = tuple(api.token_digest(t) for t in (TOKEN, OTHER_TOKEN, "third-token-xyz"))
    assert api.token_matches(presented, digests) is (presented in (TOKEN, OTHER_TOKEN))
    assert len(calls) == 3
    assert all(len(a) == len(b) == 32 for a, b in calls)


async def test_the_openapi_document_needs_no_token(client: Client) -> None:
    resp = await client.get("/api/v1/openapi.json")
    assert resp.status == 200


# --- no token configured -----------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "", "example.com"])
async def test_without_a_token_the_api_refuses_to_start_on_a_public_listener(
        database_url: str, host: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "codehub.api")
    with pytest.raises(ConfigError, match=r"auth\.admin_tokens"):
        await make_app(database_url, make_config(tokens=(), host=host))
    assert "refusing to start" in caplog.text


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
async def test_without_a_token_on_loopback_the_api_starts_and_says_so(
        database_url: str, aiohttp_client: Any, host: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "codehub.api")
    await make_app(database_url, make_config(tokens=(), host=host))
    assert "no auth.admin_tokens configured" in caplog.text and "loopback" in caplog.text


async def test_with_a_token_the_log_says_tokens_are_required(
        database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "codehub.api")
    await make_app(database_url, make_config(tokens=(TOKEN,), host="0.0.0.0"))
    assert "bearer token required" in caplog.text


async def test_without_a_token_only_direct_loopback_clients_are_answered(
        database_url: str, aiohttp_client: Any) -> None:
    app = await make_app(database_url, make_config(tokens=()))
    client: Client = await aiohttp_client(app)
    assert (await client.get(WS)).status == 200  # the test client is on 127.0.0.1
    for proxied in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}):
        await _refused(await client.get(WS, headers=proxied), 403, "api_disabled")
    # a token presented while none is configured opens nothing more
    await _refused(await client.get(WS, headers={**auth(), "X-Forwarded-For": "x"}),
                   403, "api_disabled")


# --- hostile ids -------------------------------------------------------------------------

HOSTILE_IDS = [
    "..", "..%2F..%2Fetc%2Fpasswd", "%2E%2E", "w%2F..", "w%00", "%00", "w%0A", "w%0D%0Ax",
    "a" * 64, "a" * 10_000, "%C3%A9t%C3%A9", "%F0%9F%98%80", "%EF%BC%A1", "W", "-w", "w-",
    "w_1", "w.1", "w%20", "%25", "w%FF", "%E2%80%8Bw", "w;drop%20table%20workspaces",
]


@pytest.mark.parametrize("raw_id", HOSTILE_IDS)
async def test_hostile_ids_get_a_clean_4xx_on_every_endpoint(
        client: Client, raw_id: str) -> None:
    for method, path in ENDPOINTS:
        if not path.startswith(f"{WS}/w"):
            continue
        url = URL(path.replace(f"{WS}/w", f"{WS}/{raw_id}", 1), encoded=True)
        resp = await client.request(method, url, headers=auth(), json={})
        assert 400 <= resp.status < 500, (method, url, resp.status)
        if resp.content_type == "application/json":
            assert "error" in await resp.json()


@pytest.mark.parametrize("raw_path", [
    f"{WS}/../../etc/passwd", f"{WS}/w/../../../x", "/api/v1/../v1/workspaces/%2e%2e/w",
    f"{WS}/w/restore/..", f"{WS}/w%00/retry",
])
async def test_raw_request_lines_with_dot_segments_get_a_clean_4xx(
        client: Client, raw_path: str) -> None:
    """Sent byte for byte (no client-side normalisation)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(f"GET {raw_path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await reader.readline()
    finally:
        writer.close()
    status = int(status_line.split()[1])
    assert 400 <= status < 500, (raw_path, status_line)


# --- hostile bodies and query strings ----------------------------------------------------


@pytest.mark.parametrize("raw", [
    b'{"owner": "a\\u0000b"}', b'{"owner": "\\ud800"}', b'{"owner": "o\xff"}',
    b'{"owner": "\xc3\xa9t\xc3\xa9"}', b'{"owner": "' + b"o" * 50_000 + b'"}',
    b'{"owner": "o", "id": "w\\u0000"}', b'{"owner": "o", "image": "img\\n"}',
    b'{"owner": "o", "warm_ttl_seconds": 1e400}',
    b'{"owner": "o", "warm_ttl_seconds": 99999999999999999999999999}',
    b'{"owner": "o", "warm_ttl_seconds": -1}', b'{"owner": "o", "warm_ttl_seconds": NaN}',
    b"[" * 10_000 + b"]" * 10_000, b'{"owner": {"$ne": null}}', b'{"owner": ["o"]}',
    b'{"owner": "o", "owner": "p", "x": 1}', b"\xef\xbb\xbf{}", b"\x00",
    b'{"owner": "o", "\\u0000": 1}',
])
async def test_hostile_bodies_get_a_clean_400(client: Client, raw: bytes) -> None:
    resp = await client.post(WS, data=raw, headers={**auth(),
                                                     "Content-Type": "application/json"})
    body = await resp.json()
    assert resp.status in (400, 413), body
    assert set(body["error"]) == {"code", "message"}


@pytest.mark.parametrize("query", [
    "owner=a%00b", "owner=%C3%A9", "owner=" + "o" * 5000, "status=%00", "limit=%00",
    "limit=99999999999999999999999", "limit=-1", "limit=%EF%BC%91",  # fullwidth digit one
    "cursor=" + "A" * 5000, "cursor=%00", "cursor=Li4vZXRj",  # "../etc"
    "cursor=AA", "%00=1", "owner", "&&&", "status=NEW&status=WARM",
])
async def test_hostile_query_strings_get_a_clean_400(client: Client, query: str) -> None:
    resp = await client.get(URL(f"{WS}?{query}", encoded=True), headers=auth())
    body = await resp.json()
    assert resp.status == 400 or (resp.status == 200 and query == "&&&"), body


async def test_error_messages_do_not_echo_unbounded_input(client: Client) -> None:
    resp = await client.post(WS, json={"owner": "o", "x" * 5000: 1}, headers=auth())
    body = await resp.json()
    assert resp.status == 400 and len(body["error"]["message"]) < 200


def test_codehub_serve_exits_2_when_the_api_refuses_an_open_listener(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`codehub serve` turns the API's refusal into a one-line config error (exit 2),
    before anything is started. The composition root is stood in for by one that, like
    app.py, mounts the API while building the application."""
    from codehub import cli, keys

    def build_app(cfg: Any) -> web.Application:
        app = web.Application()
        app[keys.CONFIG] = cfg
        api.setup(app)
        raise AssertionError("built an app with an open, token-less admin API")

    fake = types.ModuleType("codehub.app")
    fake.build_app = build_app  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "codehub.app", fake)
    for name in list(os.environ):
        if name.startswith("CODEHUB_") and not name.startswith("CODEHUB_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CODEHUB_SERVER__HOST", "0.0.0.0")
    assert cli.main(["serve"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "config error: auth.admin_tokens" in err and "0.0.0.0" in err
