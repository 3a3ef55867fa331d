"""A work queue with client-go's guarantees.

- An item is never handed to two workers at once.
- An item added while it is being processed is processed once more after `done()`.
- Adds of an item already waiting collapse into one.
- `add_after` delays an add; `add_rate_limited` delays by the item's own exponential
  backoff (base * 2**failures, capped), which `forget()` resets.
- `shutdown(drain=True)` refuses new adds, lets workers finish what they hold, and makes
  `get()` return None once nothing is left; `drain=False` drops what waits.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from typing import Generic, TypeVar

from ..clock import Clock, SystemClock

T = TypeVar("T")


class WorkQueue(Generic[T]):
    def __init__(self, *, clock: Clock | None = None, backoff_base: float = 1.0,
                 backoff_max: float = 300.0) -> None:
        self._clock = clock or SystemClock()
        self._queue: deque[T] = deque()
        self._dirty: set[T] = set()
        self._processing: set[T] = set()
        self._failures: dict[T, int] = {}
        self._getters: deque[asyncio.Future[None]] = deque()
        self._idle = asyncio.Event()
        self._delayed: list[tuple[float, int, T]] = []
        self._seq = itertools.count()
        self._timer: asyncio.Task[None] | None = None
        self._timer_wake = asyncio.Event()
        self._shutting_down = False
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def processing(self) -> frozenset[T]:
        return frozenset(self._processing)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def add(self, item: T) -> None:
        if self._shutting_down or item in self._dirty:
            return  # collapsed into the add that is already waiting
        self._dirty.add(item)
        if item in self._processing:
            return  # done() queues it again
        self._queue.append(item)
        self._wake_one()

    async def get(self) -> T | None:
        """The next item to process, or None once shut down and nothing waits."""
        while not self._queue:
            if self._shutting_down:
                return None
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._getters.append(fut)
            try:
                await fut
            finally:
                if fut in self._getters:
                    self._getters.remove(fut)
        item = self._queue.popleft()
        self._dirty.discard(item)
        self._processing.add(item)
        return item

    def done(self, item: T) -> None:
        self._processing.discard(item)
        if item in self._dirty:
            self._queue.append(item)
            self._wake_one()
        elif not self._processing and not self._queue:
            self._idle.set()

    def _wake_one(self) -> None:
        while self._getters:
            fut = self._getters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _wake_all(self) -> None:
        while self._getters:
            fut = self._getters.popleft()
            if not fut.done():
                fut.set_result(None)

    # -- delays and backoff ------------------------------------------------------------

    def add_after(self, item: T, delay: float) -> None:
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(item)
            return
        heapq.heappush(self._delayed, (self._clock.monotonic() + delay, next(self._seq), item))
        if self._timer is None or self._timer.done():
            self._timer = asyncio.get_running_loop().create_task(self._run_timer())
        self._timer_wake.set()

    def when(self, item: T) -> float:
        """The delay before the item's next retry; counts one more failure."""
        n = self._failures.get(item, 0)
        self._failures[item] = n + 1
        return float(min(self.backoff_max, self.backoff_base * (2 ** min(n, 62))))

    def add_rate_limited(self, item: T) -> float:
        delay = self.when(item)
        self.add_after(item, delay)
        return delay

    def forget(self, item: T) -> None:
        """Success: the item's next failure starts the backoff from the beginning."""
        self._failures.pop(item, None)

    def failures(self, item: T) -> int:
        return self._failures.get(item, 0)

    async def _run_timer(self) -> None:
        while self._delayed and not self._shutting_down:
            ready_at = self._delayed[0][0]
            now = self._clock.monotonic()
            if ready_at <= now:
                _, _, item = heapq.heappop(self._delayed)
                self.add(item)
                continue
            self._timer_wake.clear()
            sleeper = asyncio.ensure_future(self._clock.sleep(ready_at - now))
            woke = asyncio.ensure_future(self._timer_wake.wait())
            try:
                await asyncio.wait({sleeper, woke}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                woke.cancel()

    # -- shutdown ----------------------------------------------------------------------

    async def shutdown(self, *, drain: bool = True) -> None:
        """Refuse new work. With drain, return once every held and waiting item is done;
        without, drop what waits and return at once."""
        self._shutting_down = True
        self._delayed.clear()
        if self._timer is not None:
            self._timer.cancel()
        if not drain:
            self._queue.clear()
            self._dirty.clear()
        self._wake_all()
        if drain:
            while self._queue or self._processing:
                self._idle.clear()
                await self._idle.wait()
        self._wake_all()
