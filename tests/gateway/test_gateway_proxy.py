"""The HTTP proxy against the echo workspace image, through the full stack (real Docker,
real PostgreSQL): codehub/gateway/proxy.py's guarantees, one test each."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator

import pytest
from gateway_support import ECHO_ID, Stack, client, wait_for

from codehub.gateway import auth
from codehub.gateway.upstream import UpstreamConnection
from codehub.model import Operation, Status

PATTERN = bytes(range(256)) * 4096  # 1 MiB of the echo image's download pattern


def header_values(echo: dict[str, object], name: str) -> list[str]:
    headers = echo["headers"]
    assert isinstance(headers, list)
    return [v for k, v in headers if k.lower() == name.lower()]


async def raw_exchange(stack: Stack, request: bytes, *, read_until_close: bool = True) -> bytes:
    host, port = stack.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await reader.read() if read_until_close else await reader.read(65536)
    writer.close()
    await writer.wait_closed()
    return data


async def test_every_method_reaches_the_workspace_with_path_and_query(stack: Stack) -> None:
    await stack.add()
    async with client() as http:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            async with http.request(method, stack.url("/w/echo/some/path?a=1&b=two"),
                                    headers=stack.headers()) as resp:
                assert resp.status == 200, method
                echo = await resp.json()
            assert echo["method"] == method
            assert echo["path"] == "/some/path"
            assert echo["query_string"] == "a=1&b=two"


async def test_bare_workspace_path_redirects_to_its_slash(stack: Stack) -> None:
    async with client() as http, http.get(stack.url("/w/echo?x=1"), allow_redirects=False
                                          ) as resp:
        assert resp.status == 308
        assert resp.headers["Location"] == "/w/echo/?x=1"


async def test_odd_query_strings_and_encoded_paths_pass_byte_for_byte(stack: Stack) -> None:
    await stack.add()
    target = "/a%2Fb/%E2%82%AC%20x/..%2F/;p=1?q=%zz&&x=a+b&y=%2F%3F&empty=&=v&u=%E2%82%AC#"
    request = (f"GET /w/echo{target.rstrip('#')} HTTP/1.1\r\nHost: example.test\r\n"
               f"Cookie: {stack.cookie()}\r\nConnection: close\r\n\r\n").encode()
    data = await raw_exchange(stack, request)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    echo = json.loads(body)
    assert echo["raw_path"] == target.rstrip("#")


async def test_request_bodies_arrive_whole_empty_sized_and_chunked(stack: Stack) -> None:
    await stack.add()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(50):
            yield bytes([i]) * 10_000

    async with client() as http:
        async with http.post(stack.url("/w/echo/"), data=b"", headers=stack.headers()) as resp:
            echo = await resp.json()
            assert echo["body_len"] == 0
        body = b"x" * 123_457
        async with http.post(stack.url("/w/echo/"), data=body, headers=stack.headers()) as resp:
            echo = await resp.json()
            assert echo["body_len"] == len(body)
            assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
            assert header_values(echo, "Content-Length") == [str(len(body))]
        async with http.post(stack.url("/w/echo/"), data=chunks(), headers=stack.headers()
                             ) as resp:
            echo = await resp.json()
            expected = b"".join(bytes([i]) * 10_000 for i in range(50))
            assert echo["body_len"] == len(expected)
            assert echo["body_sha256"] == hashlib.sha256(expected).hexdigest()
            assert header_values(echo, "Transfer-Encoding") == ["chunked"]


async def test_100_mb_upload_and_download_stream_without_buffering(stack: Stack) -> None:
    await stack.add()
    size = 100 * 1024 * 1024
    digest = hashlib.sha256()

    async def upload() -> AsyncIterator[bytes]:
        block = PATTERN
        for _ in range(size // len(block)):
            digest.update(block)
            yield block

    async with client() as http:
        async with http.put(stack.url("/w/echo/upload"), data=upload(),
                            headers=stack.headers(**{"Content-Length": str(size)})) as resp:
            echo = await resp.json()
        assert echo["body_len"] == size
        assert echo["body_sha256"] == digest.hexdigest()
        for chunked in ("0", "1"):
            got = hashlib.sha256()
            n = 0
            async with http.get(stack.url(f"/w/echo/_echo/download?size={size}&chunked={chunked}"),
                                headers=stack.headers()) as resp:
                assert resp.status == 200
                async for piece in resp.content.iter_chunked(1 << 20):
                    got.update(piece)
                    n += len(piece)
            assert n == size
            assert got.hexdigest() == hashlib.sha256(PATTERN * 100).hexdigest()


async def test_multi_value_response_headers_are_kept(stack: Stack) -> None:
    await stack.add()
    async with client() as http, http.get(
            stack.url("/w/echo/_echo/headers?set-cookie=a%3D1&set-cookie=b%3D2&x-multi=1"
                      "&x-multi=2&content-encoding=gzip"),
            headers=stack.headers()) as resp:
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert resp.headers.getall("X-Multi") == ["1", "2"]
        assert resp.headers["Content-Encoding"] == "gzip"  # passed through, not decoded


async def test_hop_by_hop_and_connection_named_headers_are_dropped(stack: Stack) -> None:
    await stack.add()
    headers = stack.headers(**{
        "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "5",
        "TE": "trailers", "Proxy-Authorization": "Basic eA==", "X-End-To-End": "yes"})
    async with client() as http:
        async with http.get(stack.url("/w/echo/"), headers=headers) as resp:
            echo = await resp.json()
        for name in ("X-Secret-Hop", "Keep-Alive", "TE", "Proxy-Authorization", "Connection"):
            assert header_values(echo, name) == [], name
        assert header_values(echo, "X-End-To-End") == ["yes"]
        async with http.get(stack.url("/w/echo/_echo/headers?x-hop=1&connection=x-hop"
                                      "&keep-alive=timeout%3D5&x-kept=1"),
                            headers=stack.headers()) as resp:
            assert "X-Kept" in resp.headers
            assert "Keep-Alive" not in resp.headers


async def test_host_is_kept_and_forwarded_headers_are_set(stack: Stack) -> None:
    await stack.add()
    async with client() as http, http.get(
            stack.url("/w/echo/x"), headers=stack.headers(**{"Host": "ide.example.test"})
            ) as resp:
        echo = await resp.json()
    assert header_values(echo, "Host") == ["ide.example.test"]
    assert header_values(echo, "X-Forwarded-Host") == ["ide.example.test"]
    assert header_values(echo, "X-Forwarded-Proto") == ["http"]
    assert header_values(echo, "X-Forwarded-Prefix") == ["/w/echo"]
    assert header_values(echo, "X-Forwarded-For") == ["127.0.0.1"]


async def test_exactly_one_request_id_reaches_the_workspace_the_clients_when_well_formed(
        stack: Stack) -> None:
    await stack.add()
    seen = []
    async with client() as http:
        for given in (None, "trace-42.a:b", "bad id;x", "x" * 129):
            extra = {} if given is None else {"X-Request-Id": given}
            async with http.get(stack.url("/w/echo/"), headers=stack.headers(**extra)) as r:
                values = header_values(await r.json(), "X-Request-Id")
            assert len(values) == 1, values
            seen.append(values[0])
    made, kept, *replaced = seen
    assert kept == "trace-42.a:b"
    assert all(len(v) == 16 and int(v, 16) >= 0 for v in (made, *replaced))
    assert len({made, *replaced}) == 3


async def test_request_headers_are_not_added_to_by_the_proxy(stack: Stack) -> None:
    await stack.add()
    request = (f"GET /w/echo/ HTTP/1.1\r\nHost: h\r\nCookie: {stack.cookie()}\r\n"
               "Connection: close\r\n\r\n").encode()
    body = (await raw_exchange(stack, request)).partition(b"\r\n\r\n")[2]
    names = [k.lower() for k, _ in json.loads(body)["headers"]]
    assert "accept-encoding" not in names and "user-agent" not in names and "accept" not in names


async def test_head_204_and_304_have_empty_bodies(stack: Stack) -> None:
    await stack.add()
    for request, status in (
            ("HEAD /w/echo/_echo/download?size=5000", b"200"),
            ("GET /w/echo/_echo/status/204", b"204"),
            ("GET /w/echo/_echo/status/304", b"304")):
        # Two requests on one connection: a body after a bodiless answer would corrupt
        # the second response.
        one = (f"{request} HTTP/1.1\r\nHost: h\r\nCookie: {stack.cookie()}\r\n\r\n").encode()
        two = (f"GET /w/echo/_echo/status/201 HTTP/1.1\r\nHost: h\r\n"
               f"Cookie: {stack.cookie()}\r\nConnection: close\r\n\r\n").encode()
        data = await raw_exchange(stack, one + two)
        first, _, rest = data.partition(b"\r\n\r\n")
        assert first.split(b" ")[1] == status, first
        if request.startswith("HEAD"):
            assert b"Content-Length: 5000" in first
        assert rest.startswith(b"HTTP/1.1 201"), rest[:100]


async def test_status_codes_pass_through(stack: Stack) -> None:
    await stack.add()
    async with client() as http:
        for code in (201, 302, 404, 418, 500, 503):
            async with http.get(stack.url(f"/w/echo/_echo/status/{code}"),
                                headers=stack.headers(), allow_redirects=False) as resp:
                assert resp.status == code


async def test_upstream_closing_early_truncates_the_client_response(stack: Stack) -> None:
    await stack.add()
    request = (f"GET /w/echo/_echo/close-early HTTP/1.1\r\nHost: h\r\n"
               f"Cookie: {stack.cookie()}\r\n\r\n").encode()
    data = await raw_exchange(stack, request)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 1000" in head
    assert len(body) < 1000  # the connection was cut: never a complete-looking response
    # The gateway keeps serving.
    async with client() as http, http.get(stack.url("/w/echo/"), headers=stack.headers()) as r:
        assert r.status == 200


async def test_client_disconnecting_early_releases_the_upstream_connection(
        stack: Stack) -> None:
    await stack.add()
    host, port = stack.base.removeprefix("http://").split(":")
    for _ in range(3):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write((f"GET /w/echo/_echo/download?size={500 * 1024 * 1024} HTTP/1.1\r\n"
                      f"Host: h\r\nCookie: {stack.cookie()}\r\n\r\n").encode())
        await reader.readexactly(1024 * 1024)
        writer.transport.abort()
    pool = stack.gw.pool

    async def settled() -> bool:
        return pool.stats()[1] == 0

    deadline = asyncio.get_running_loop().time() + 10
    while not await settled():
        assert asyncio.get_running_loop().time() < deadline, pool.stats()
        await asyncio.sleep(0.05)
    async with client() as http, http.get(stack.url("/w/echo/"), headers=stack.headers()) as r:
        assert r.status == 200


async def test_slow_responses_are_not_cut_by_a_timeout(stack: Stack) -> None:
    await stack.add()
    async with client() as http, http.get(stack.url("/w/echo/_echo/slow?seconds=6"),
                                          headers=stack.headers()) as resp:
        assert resp.status == 200
        assert (await resp.json()) == {"slept": 6.0}


async def test_keep_alive_connections_to_the_workspace_are_reused(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    await stack.add()
    pool = stack.gw.pool
    # Each acquire: was a connection handed back to the pool (healthy) since the last
    # one, and was one reused. (A request whose client went away mid-response hands its
    # upstream connection back half-read, so the next one rightly opens a new one.)
    log: list[tuple[bool, bool]] = []
    returned = False
    acquire, release = pool.acquire, pool.release

    async def counting_acquire(host: str, port: int) -> tuple[UpstreamConnection, bool]:
        nonlocal returned
        conn, was_reused = await acquire(host, port)
        log.append((returned, was_reused))
        returned = False
        return conn, was_reused

    def counting_release(conn: UpstreamConnection, *, reusable: bool) -> None:
        nonlocal returned
        returned = returned or (reusable and conn.reusable)
        release(conn, reusable=reusable)

    monkeypatch.setattr(pool, "acquire", counting_acquire)
    monkeypatch.setattr(pool, "release", counting_release)
    async with client() as http:
        for _ in range(20):
            async with http.get(stack.url("/w/echo/"), headers=stack.headers()) as resp:
                assert resp.status == 200
                await resp.read()  # a body left unread makes the client close its connection
    assert len(log) >= 20 and log[0] == (False, False), log
    assert all(was_reused == returned for returned, was_reused in log), log
    assert sum(returned for returned, _ in log) >= 18, log
    # A body with a Content-Length is complete for the client once its last byte is
    # written; the handler returns the connection to the pool just after that.
    await wait_for(lambda: pool.stats()[1] == 0, timeout=5)
    idle, busy = pool.stats()
    assert busy == 0 and idle <= 2


async def test_cached_route_serves_requests_without_database_queries(stack: Stack) -> None:
    await stack.add()
    async with client() as http:
        for _ in range(50):
            async with http.get(stack.url("/w/echo/"), headers=stack.headers()) as resp:
                assert resp.status == 200
    assert stack.gw.routes.loads == 1


async def test_hint_invalidates_the_route(stack: Stack) -> None:
    await stack.add()
    async with client() as http:
        async with http.get(stack.url("/w/echo/"), headers=stack.headers()) as resp:
            assert resp.status == 200
        # The workspace steps down behind the gateway's back; the hint tells it.
        await stack.store.compare_and_set(ECHO_ID, expect_status=Status.RUNNING,
                                          expect_operation=Operation.NONE, status=Status.WARM)
        await stack.hints.publish(ECHO_ID)
        await asyncio.sleep(0.1)
        async with http.get(stack.url("/w/echo/"), headers=stack.headers()) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "5"


async def test_refused_connection_rereads_the_row_and_answers_with_a_page(
        stack: Stack) -> None:
    await stack.add()
    gw = stack.gw
    route = await gw.routes.get(ECHO_ID)
    route.port = 1  # a stale route: nothing listens there
    async with client() as http, http.get(stack.url("/w/echo/"), headers=stack.headers(
            Accept="text/html")) as resp:
        # The row still says RUNNING: the page says the IDE is not answering.
        assert resp.status == 502
        assert "not answering" in await resp.text()
    # The re-read route works again.
    async with client() as http, http.get(stack.url("/w/echo/"), headers=stack.headers()) as r:
        assert r.status == 200


def test_cookie_splitting_keeps_other_cookies() -> None:
    values, rest = auth.split_cookie_header(f"a=1; {auth.COOKIE_NAME}=v; b=2")
    assert values == ["v"] and rest == "a=1; b=2"
    assert auth.split_cookie_header("a=1") == ([], "a=1")
    assert auth.split_cookie_header(f"{auth.COOKIE_NAME}=v") == (["v"], None)
    # Several of ours (one tossed by a sibling origin for the parent domain): all kept out
    # of the workspace's Cookie, all offered to verification in order.
    assert auth.split_cookie_header(f"{auth.COOKIE_NAME}=x; c=3; {auth.COOKIE_NAME}=y") == (
        ["x", "y"], "c=3")
