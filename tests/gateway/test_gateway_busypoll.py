"""Polling before sleeping (codehub/gateway/busypoll.py): the loop polls for its budget
after a kick, yielding the CPU each round, then sleeps; nothing polls at rest or with a
zero budget; a proxied request and a relayed WebSocket chunk each kick it."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from gateway_support import ECHO_ID, Stack, client

from codehub.gateway import busypoll
from codehub.gateway.busypoll import BusyPoll

WS_PATH = f"/w/{ECHO_ID}/_echo/ws"


@pytest.fixture
def rounds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many poll rounds ran (each round yields the CPU first: counted there)."""
    count = [0]

    def counted() -> None:
        count[0] += 1

    monkeypatch.setattr(busypoll, "_yield", counted)
    return count


async def test_a_kick_keeps_the_loop_polling_for_its_budget_then_it_sleeps(
        rounds: list[int]) -> None:
    poll = BusyPoll(0.05)
    poll.kick()
    assert poll.polling
    await asyncio.sleep(0.3)
    # Rounds ran back to back, each yielding the CPU first, and stopped with the budget.
    assert rounds[0] > 10, rounds
    assert not poll.polling
    spent, before = rounds[0], time.process_time()
    await asyncio.sleep(0.3)
    assert rounds[0] == spent, "polling went on past its budget"
    assert time.process_time() - before < 0.1, "the loop used CPU at rest"


async def test_kicks_while_polling_extend_the_budget_and_schedule_one_round_at_a_time(
        rounds: list[int]) -> None:
    poll = BusyPoll(0.05)
    loop = asyncio.get_running_loop()
    for _ in range(100):
        poll.kick()
    await asyncio.sleep(0)  # one loop iteration: one round ran, not one per kick
    assert rounds[0] <= 1, rounds
    end = loop.time() + 0.15
    while loop.time() < end:  # kicked every 10 ms for 150 ms: polling the whole time
        poll.kick()
        await asyncio.sleep(0.01)
        assert poll.polling
    await asyncio.sleep(0.3)
    assert not poll.polling


async def test_a_zero_budget_never_polls(rounds: list[int]) -> None:
    poll = BusyPoll(0)
    poll.kick()
    assert not poll.polling
    await asyncio.sleep(0.05)
    assert rounds[0] == 0


async def test_a_proxied_request_and_a_relayed_websocket_chunk_each_make_the_loop_poll(
        stack: Stack, rounds: list[int]) -> None:
    await stack.add()
    stack.gw.busy_poll.budget = 0.05
    async with client() as http:
        async with http.get(stack.url(f"/w/{ECHO_ID}/"), headers=stack.headers()) as resp:
            assert resp.status == 200
            await resp.read()
        await asyncio.sleep(0.3)
        assert rounds[0] > 0, "a proxied request did not kick the poll"
        assert not stack.gw.busy_poll.polling
        after_http = rounds[0]
        async with http.ws_connect(stack.url(WS_PATH).replace("http", "ws"),
                                   headers=stack.headers()) as sock:
            await asyncio.sleep(0.3)  # the upgrade's own kicks have run out
            opened = rounds[0]
            await sock.send_str("ping")
            msg = await sock.receive(timeout=10)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "ping")
            await asyncio.sleep(0.3)
            assert rounds[0] > opened, "a relayed chunk did not kick the poll"
    assert after_http <= opened
