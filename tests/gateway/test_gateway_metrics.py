"""The gateway's metrics move when the gateway does the thing they count: proxied requests,
proxy errors, relayed WebSockets and activity flushes, driven through a real gateway."""

from __future__ import annotations

from gateway_support import ECHO_ID, Stack, client, wait_for
from harness.services import free_port

from codehub import metrics


def value(name: str) -> float:
    got = metrics.REGISTRY.get_sample_value(name)
    return 0.0 if got is None else got



async def test_proxied_requests_and_unreachable_workspaces_are_counted(stack: Stack) -> None:
    await stack.add()
    requests, errors = value("codehub_proxy_requests_total"), value("codehub_proxy_errors_total")
    async with client() as http:
        for _ in range(3):
            async with http.get(stack.url("/w/echo/"), headers=stack.headers()) as resp:
                assert resp.status == 200
        assert value("codehub_proxy_requests_total") - requests == 3
        assert value("codehub_proxy_errors_total") == errors
        route = await stack.gw.routes.get(ECHO_ID)
        route.host, route.port = "127.0.0.1", free_port()  # nothing listens there
        async with http.get(stack.url("/w/echo/"), headers=stack.headers()) as resp:
            assert resp.status >= 500
    assert value("codehub_proxy_requests_total") - requests == 4
    assert value("codehub_proxy_errors_total") - errors == 1


async def test_relayed_websockets_are_counted_while_open_and_in_total(stack: Stack) -> None:
    await stack.add()
    open_before = value("codehub_websocket_connections")
    opened = value("codehub_websocket_connections_opened_total")
    ws_url = stack.url("/w/echo/_echo/ws").replace("http://", "ws://")
    async with client() as http:
        async with http.ws_connect(ws_url, headers=stack.headers()) as ws:
            await ws.send_str("ping")
            await ws.receive()
            assert value("codehub_websocket_connections") - open_before == 1
            assert value("codehub_websocket_connections_opened_total") - opened == 1
        await wait_for(lambda: value("codehub_websocket_connections") == open_before)
    assert value("codehub_websocket_connections_opened_total") - opened == 1


async def test_an_activity_flush_records_its_lag_and_time(stack: Stack) -> None:
    await stack.add()
    metrics.FLUSH_LAST.set(0)
    metrics.FLUSH_LAG.set(-1)
    async with client() as http, http.get(stack.url("/w/echo/"),
                                          headers=stack.headers()) as resp:
        assert resp.status == 200
    await stack.gw.activity.flush()
    assert value("codehub_activity_flush_last_timestamp_seconds") > 0
    assert value("codehub_activity_flush_lag_seconds") >= 0
