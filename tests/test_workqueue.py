"""The work queue's guarantees, one test each (named after client-go's)."""

from __future__ import annotations

import asyncio
from collections import Counter

from codehub.clock import FakeClock
from codehub.reconciler.workqueue import WorkQueue


async def test_basic_items_come_out_in_order() -> None:
    q: WorkQueue[str] = WorkQueue()
    for x in "abc":
        q.add(x)
    assert [await q.get() for _ in range(3)] == ["a", "b", "c"]


async def test_collapse_adds_while_queued() -> None:
    q: WorkQueue[str] = WorkQueue()
    for _ in range(5):
        q.add("a")
    q.add("b")
    assert len(q) == 2


async def test_add_while_processing_is_processed_again_after_done() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    item = await q.get()
    q.add("a")
    q.add("a")  # collapses with the previous add
    assert len(q) == 0  # not handed out while "a" is being processed
    q.done(item)  # type: ignore[arg-type]
    assert len(q) == 1 and await q.get() == "a"
    q.done("a")
    assert len(q) == 0


async def test_never_two_workers_on_one_item() -> None:
    q: WorkQueue[int] = WorkQueue()
    active: Counter[int] = Counter()
    worst = 0
    processed: Counter[int] = Counter()

    async def worker() -> None:
        nonlocal worst
        while (item := await q.get()) is not None:
            active[item] += 1
            worst = max(worst, active[item])
            await asyncio.sleep(0.001)
            if processed[item] < 3:
                q.add(item)  # add while processing
            processed[item] += 1
            active[item] -= 1
            q.done(item)

    workers = [asyncio.create_task(worker()) for _ in range(8)]
    for i in range(20):
        q.add(i % 5)
    await asyncio.sleep(0.3)
    await q.shutdown(drain=True)
    await asyncio.gather(*workers)
    assert worst == 1
    assert all(processed[i] >= 4 for i in range(5))  # re-adds during processing all ran


async def test_backoff_is_exponential_capped_and_reset_by_forget() -> None:
    q: WorkQueue[str] = WorkQueue(backoff_base=1, backoff_max=10)
    assert [q.when("a") for _ in range(6)] == [1, 2, 4, 8, 10, 10]
    assert q.when("b") == 1  # per item
    q.forget("a")
    assert q.when("a") == 1


async def test_rate_limited_add_waits_for_the_clock_not_the_wall() -> None:
    clock = FakeClock()
    q: WorkQueue[str] = WorkQueue(clock=clock, backoff_base=5, backoff_max=60)
    assert q.add_rate_limited("a") == 5
    assert q.add_rate_limited("a") == 10  # 2nd failure; the earlier timer fires first
    await clock.advance(4.9)
    assert len(q) == 0
    await clock.advance(0.2)
    assert len(q) == 1
    assert await q.get() == "a"
    q.done("a")
    await clock.advance(10)
    assert len(q) == 1  # the second delayed add


async def test_add_after_orders_by_deadline() -> None:
    clock = FakeClock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add_after("late", 30)
    q.add_after("early", 10)
    await clock.advance(15)
    assert await q.get() == "early"
    await clock.advance(15)
    assert await q.get() == "late"


async def test_shutdown_with_drain_waits_for_held_items() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    q.add("b")
    held = await q.get()
    stopper = asyncio.create_task(q.shutdown(drain=True))
    await asyncio.sleep(0.01)
    assert not stopper.done()
    q.add("c")  # refused after shutdown
    assert await q.get() == "b"  # waiting items are still handed out
    q.done("b")
    assert not stopper.done()  # "a" is still held
    q.done(held)  # type: ignore[arg-type]
    await asyncio.wait_for(stopper, 1)
    assert await q.get() is None


async def test_shutdown_without_drain_drops_waiting_and_releases_getters() -> None:
    q: WorkQueue[str] = WorkQueue()
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    await q.shutdown(drain=False)
    assert await asyncio.wait_for(getter, 1) is None
    q.add("x")
    assert await q.get() is None
