"""Polling before sleeping: for a short while after proxy activity, the event loop keeps
polling its sockets instead of blocking in epoll at once.

Why: a request through the gateway crosses two hops (browser -> gateway -> workspace and
back), and on a VM each hop that finds its CPU halted pays for waking it (on the 2-vCPU VM
of the README's figures, whose guest halt-polling is off, about 40 us per wake-up). Right
after the gateway has sent a request to a workspace, or answered a browser, the next
thing to happen is nearly always the reply, or that browser's next request; while the
loop polls, neither has to wake the gateway's CPU. This is the guest's halt-polling done
by the one process that knows when a wake-up is coming (Go's scheduler spins before
parking for the same reason). Measured in the README ("Polling before sleeping").

Guarantees:
- The loop polls only within `budget` seconds of the last `kick`; then it sleeps as it
  always did: a gateway with no traffic uses no CPU.
- Polling never costs more than the work it serves: in each second, the time spent in
  back-to-back poll rounds stays below the time the loop spent on real work between
  rounds plus ALLOWANCE. So a client that sends a tiny chunk just often enough to keep
  the window open (a hostile trickle) buys at most twice the CPU its traffic costs anyway,
  not a polling core.
- Back-to-back rounds (the loop had nothing else to do) first yield the CPU
  (sched_yield) to any other task ready to run on the same CPU.
- Under load the loop is busy anyway: a round is one Python callback per loop iteration,
  without the system call; its cost is measured in the README.
- A round runs on the loop that scheduled it, and a kick from another loop (a new one
  after the first closed) starts polling there.
- budget 0 turns it off: `kick` does nothing.
"""

from __future__ import annotations

import asyncio
import os
import time

_now = time.perf_counter
_yield = getattr(os, "sched_yield", lambda: None)
# Rounds closer than this are back to back (the loop had nothing else to do: polling); a
# longer gap between rounds is the loop doing real work.
BACK_TO_BACK = 20e-6
# Polling allowed per second beyond the work counted, so that the first bursts of a quiet
# second get their polls; and the most one gap counts as work (a process descheduled for
# longer did no work meanwhile).
ALLOWANCE = 0.005
MAX_WORK_GAP = 0.001
WINDOW = 1.0


class BusyPoll:
    """`kick()` after each piece of proxy work; the loop keeps polling for `budget` s."""

    __slots__ = ("_active", "_last", "_loop", "_spent", "_until", "_window_end", "_worked",
                 "budget")

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self._until = 0.0
        self._last = 0.0  # when the last round ran (or polling began)
        self._active = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop polling now
        self._window_end = 0.0
        self._spent = 0.0  # this window: seconds between back-to-back rounds
        self._worked = 0.0  # this window: seconds of real work between rounds

    @property
    def polling(self) -> bool:
        """Whether a poll round is scheduled (for tests)."""
        return self._active

    def kick(self) -> None:
        if not self.budget:
            return
        now = _now()
        self._until = now + self.budget
        loop = asyncio.get_running_loop()
        if self._active and self._loop is loop:
            return
        if now >= self._window_end:
            self._new_window(now)
        if self._spent >= self._worked + ALLOWANCE:
            return  # this second's polling is spent: sleep as usual until the next
        self._active = True
        self._last = now
        self._loop = loop
        loop.call_soon(self._poll, loop)

    def _new_window(self, now: float) -> None:
        self._window_end = now + WINDOW
        self._spent = self._worked = 0.0

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        # A ready callback makes the loop's next wait for its sockets a poll that does not
        # block; this one re-arms itself until the budget (or this second's share) is spent.
        if loop is not self._loop:
            return  # a round left on a loop that is no longer the one polling
        now = _now()
        gap = now - self._last
        self._last = now
        if now >= self._window_end:
            self._new_window(now)
        back_to_back = gap < BACK_TO_BACK
        if back_to_back:
            self._spent += gap
        else:
            self._worked += min(gap, MAX_WORK_GAP)
        if now < self._until and self._spent < self._worked + ALLOWANCE:
            if back_to_back:
                _yield()  # the loop is idle but for us: let any ready task run first
            loop.call_soon(self._poll, loop)
        else:
            self._active = False
