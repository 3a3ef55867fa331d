"""Polling before sleeping: for a short while after proxy activity, the event loop keeps
polling its sockets instead of blocking in epoll at once.

Why: a request through the gateway crosses two hops (browser -> gateway -> workspace and
back), and on a VM each hop that finds its CPU halted pays for waking it (on the 2-vCPU VM
of the README's figures, whose guest halt-polling is off, about 40 us per wake-up). Right
after the gateway has sent a request to a workspace, or answered a browser, the next
thing to happen is nearly always the reply, or that browser's next request; while the
loop polls, neither has to wake the gateway's CPU. This is the guest's halt-polling done
by the one process that knows when a wake-up is coming (Go's scheduler spins before
parking for the same reason). Measured in the README ("Latency at one connection").

Guarantees:
- The loop polls only within `budget` seconds of the last `kick`; then it sleeps as it
  always did: a gateway with no traffic uses no CPU.
- Back-to-back poll rounds (the loop had nothing else to do) first yield the CPU
  (sched_yield) to any other task that is ready to run on it: polling spends CPU time
  nobody else is asking for.
- Under load the loop is busy anyway: a round is one Python callback per loop iteration,
  without the system call; its cost is measured in the README.
- budget 0 turns it off: `kick` does nothing.
"""

from __future__ import annotations

import asyncio
import os
import time

_now = time.perf_counter
# Rounds closer than this are back to back (the loop had nothing else to do); a round after
# a longer gap comes after real work (under load) and skips the yield's system call.
BACK_TO_BACK = 20e-6
_yield = getattr(os, "sched_yield", lambda: None)


class BusyPoll:
    """`kick()` after each piece of proxy work; the loop keeps polling for `budget` s."""

    __slots__ = ("_active", "_last", "_loop", "_until", "budget")

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self._until = 0.0
        self._last = 0.0  # when the last round ran
        self._active = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop polling now

    @property
    def polling(self) -> bool:
        """Whether a poll round is scheduled (for tests)."""
        return self._active

    def kick(self) -> None:
        if not self.budget:
            return
        self._until = _now() + self.budget
        if not self._active:
            self._active = True
            self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        # A ready callback makes the loop's next wait for its sockets a poll that does not
        # block; this one re-arms itself until the budget is spent.
        now = _now()
        if now < self._until:
            if now - self._last < BACK_TO_BACK:
                _yield()  # the loop is idle but for us: let any ready task run first
            self._last = now
            assert self._loop is not None
            self._loop.call_soon(self._poll)
        else:
            self._active = False
