"""Activity marks: which workspaces were used, written to the database in batches.

Guarantees:
- `mark()` is a dict store and a clock read, no I/O: it runs for every proxied request
  and every relayed WebSocket message, in both directions.
- Every `interval` seconds (gateway.activity_flush_interval, 5 s by default) all marks
  gathered since the last flush are written in ONE statement (`Store.flush_activity`),
  whatever the request rate. The interval is a trade: TTLs are minutes to days, so a few
  seconds of lag never decide a step-down, while the database sees one small UPDATE per
  interval per replica. A crash loses at most one interval of marks (the workspace then
  looks idle that much longer).
- A mark is never moved backwards (the store keeps the latest), and a failed flush keeps
  its marks for the next one (logged once per outage, not per attempt).
- With `keep_sockets_active`, a workspace with an open relayed WebSocket is marked at
  every flush even if the socket is silent; without it only messages count: all of them
  (gateway.activity = "traffic"), or with `sort_sockets` ("input") only those a person
  caused (tunnel.py), so code-server's own keep-alives do not keep an untouched tab's
  workspace up.
- Stopping the gateway flushes what is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from ..metrics import activity_flushed
from ..store import Store, StoreUnavailable

log = logging.getLogger(__name__)


class Activity:
    def __init__(self, store: Store, *, interval: float, keep_sockets_active: bool = False,
                 clock: Callable[[], float], sort_sockets: bool = False) -> None:
        self.store = store
        self.interval = interval
        self.keep_sockets_active = keep_sockets_active
        self.sort_sockets = sort_sockets  # gateway.activity = "input"
        self.clock = clock
        self.marks: dict[str, float] = {}
        self.sockets: dict[str, int] = {}
        self._failing = False

    def mark(self, workspace_id: str) -> None:
        self.marks[workspace_id] = self.clock()

    def socket_opened(self, workspace_id: str) -> None:
        self.sockets[workspace_id] = self.sockets.get(workspace_id, 0) + 1

    def socket_closed(self, workspace_id: str) -> None:
        n = self.sockets.get(workspace_id, 0) - 1
        if n > 0:
            self.sockets[workspace_id] = n
        else:
            self.sockets.pop(workspace_id, None)

    async def flush(self) -> int:
        """Write the gathered marks; returns the number of rows updated."""
        if self.keep_sockets_active and self.sockets:
            now = self.clock()
            for wid in self.sockets:
                self.marks[wid] = now
        if not self.marks:
            return 0
        marks, self.marks = self.marks, {}
        oldest = min(marks.values())
        ids = list(marks)
        stamps = [datetime.fromtimestamp(marks[i], UTC) for i in ids]
        try:
            updated = await self.store.flush_activity(ids, stamps)
        except StoreUnavailable as exc:
            for wid, ts in marks.items():  # keep them, newest wins
                if self.marks.get(wid, 0.0) < ts:
                    self.marks[wid] = ts
            if not self._failing:
                log.warning("activity flush failed, keeping %d marks for the next one: %s",
                            len(marks), exc)
                self._failing = True
            return 0
        if self._failing:
            log.info("activity flush works again")
            self._failing = False
        activity_flushed(max(0.0, self.clock() - oldest))
        return updated

    async def run(self) -> None:
        """Flush every `interval` seconds until cancelled (the owner flushes once more)."""
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()
