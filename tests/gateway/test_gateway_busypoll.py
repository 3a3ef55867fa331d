"""Polling before sleeping (codehub/gateway/busypoll.py): the loop polls for its budget
after a kick, then sleeps; nothing polls at rest or with a zero budget; polling never
costs more than the work it serves (a hostile trickle of kicks buys no polling core, nor
does a trickle of 1-byte WebSocket messages through the gateway to the real echo
workspace); a proxied request and a relayed WebSocket chunk each kick it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import pytest
from gateway_support import ECHO_ID, Stack, client

from codehub.gateway.busypoll import ALLOWANCE, BusyPoll

WS_PATH = f"/w/{ECHO_ID}/_echo/ws"


@pytest.fixture
def rounds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many poll rounds ran."""
    count = [0]
    real: Callable[[BusyPoll, asyncio.AbstractEventLoop], None] = BusyPoll._poll

    def counted(self: BusyPoll, loop: asyncio.AbstractEventLoop) -> None:
        count[0] += 1
        real(self, loop)

    monkeypatch.setattr(BusyPoll, "_poll", counted)
    return count


async def test_a_kick_makes_the_loop_poll_then_sleep_and_at_rest_nothing_runs(
        rounds: list[int]) -> None:
    poll = BusyPoll(0.05)
    poll.kick()
    assert poll.polling
    await asyncio.sleep(0.3)
    assert rounds[0] > 10, rounds  # rounds ran back to back...
    assert not poll.polling  # ...and stopped
    spent, before = rounds[0], time.process_time()
    await asyncio.sleep(0.3)
    assert rounds[0] == spent, "polling went on after it stopped"
    assert time.process_time() - before < 0.1, "the loop used CPU at rest"


async def test_many_kicks_schedule_one_round_at_a_time(rounds: list[int]) -> None:
    poll = BusyPoll(0.05)
    for _ in range(100):
        poll.kick()
    await asyncio.sleep(0)  # one loop iteration: one round ran, not one per kick
    assert rounds[0] <= 1, rounds


async def test_a_trickle_of_kicks_without_work_buys_no_polling_core(
        rounds: list[int]) -> None:
    # A hostile client keeps the window open with a tiny chunk every millisecond, which
    # costs the loop next to nothing: the polling stops at this second's allowance.
    poll = BusyPoll(1.0)
    loop = asyncio.get_running_loop()
    before = time.process_time()
    end = loop.time() + 0.5
    while loop.time() < end:
        poll.kick()
        await asyncio.sleep(0.001)
    used = time.process_time() - before
    # Unbounded polling would have used the whole 0.5 s; the allowance is 5 ms, the kicks
    # and the sleeps themselves a few ms more.
    assert used < 0.1, f"{used:.3f} s of CPU in 0.5 s"
    assert rounds[0] > 0


async def test_work_between_rounds_earns_polling(rounds: list[int]) -> None:
    # The proxy's own work is counted: "requests" of 300 us of work, each followed by
    # 100 us of waiting (polled), go on being polled past the allowance, because the loop
    # works three times as long as it polls.
    poll = BusyPoll(0.01)
    loop = asyncio.get_running_loop()
    end = loop.time() + 0.3
    polled_late = 0
    while loop.time() < end:
        poll.kick()
        busy_until = time.perf_counter() + 0.0003
        while time.perf_counter() < busy_until:
            pass
        idle_until = time.perf_counter() + 0.0001
        while time.perf_counter() < idle_until:  # waiting: loop iterations, polled
            await asyncio.sleep(0)
        if loop.time() > end - 0.1:
            polled_late += poll.polling
    assert polled_late > 0, "polling stopped although the loop kept working"
    assert poll._spent <= poll._worked + ALLOWANCE + 0.001


async def test_a_zero_budget_never_polls(rounds: list[int]) -> None:
    poll = BusyPoll(0)
    poll.kick()
    assert not poll.polling
    await asyncio.sleep(0.05)
    assert rounds[0] == 0


def test_a_new_loop_polls_although_the_last_one_closed_mid_round(rounds: list[int]) -> None:
    poll = BusyPoll(0.05)

    async def kick() -> None:
        poll.kick()

    asyncio.run(kick())  # the loop closes with a round still scheduled
    assert poll.polling
    seen = rounds[0]

    async def kick_and_wait() -> None:
        poll.kick()
        await asyncio.sleep(0.01)

    asyncio.run(kick_and_wait())
    assert rounds[0] > seen, "the new loop never polled"


async def test_a_proxied_request_and_a_relayed_websocket_chunk_each_make_the_loop_poll(
        stack: Stack, rounds: list[int]) -> None:
    await stack.add()
    stack.gw.busy_poll.budget = 0.05
    async with client() as http:
        await asyncio.sleep(1.1)  # a fresh second's allowance
        async with http.get(stack.url(f"/w/{ECHO_ID}/"), headers=stack.headers()) as resp:
            assert resp.status == 200
            await resp.read()
        await asyncio.sleep(0.3)
        assert rounds[0] > 0, "a proxied request did not kick the poll"
        assert not stack.gw.busy_poll.polling
        async with http.ws_connect(stack.url(WS_PATH).replace("http", "ws"),
                                   headers=stack.headers()) as sock:
            await asyncio.sleep(1.1)  # the upgrade's own kicks have run out; a new second
            opened = rounds[0]
            await sock.send_str("ping")
            msg = await sock.receive(timeout=10)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "ping")
            await asyncio.sleep(0.3)
            assert rounds[0] > opened, "a relayed chunk did not kick the poll"


async def test_a_websocket_trickle_through_the_gateway_buys_no_polling_core(
        stack: Stack) -> None:
    # The attacker's side: one relayed WebSocket to the real echo workspace, a 1-byte
    # message every millisecond, each keeping the polling window open. The process (the
    # gateway and this client share it) must not poll a core for it.
    await stack.add()
    stack.gw.busy_poll.budget = 1.0
    url = stack.url(WS_PATH).replace("http", "ws")
    async with client() as http, http.ws_connect(url, headers=stack.headers()) as sock:
        loop = asyncio.get_running_loop()
        before, sent = time.process_time(), 0
        end = loop.time() + 1.0
        while loop.time() < end:
            await sock.send_bytes(b"x")
            msg = await sock.receive(timeout=10)
            assert msg.data == b"x"
            sent += 1
            await asyncio.sleep(0.001)
        used = time.process_time() - before
    # Unbounded, the loop would have polled the whole second (about 1 s of CPU).
    assert used < 0.6, f"{used:.2f} s of CPU for {sent} one-byte messages in 1 s"
