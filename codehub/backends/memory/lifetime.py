"""The lifetime of the in-memory adapters (codehub.interfaces.Adapter), made visible.

Guarantees:
- `is_open` is True between `open()` (entering `async with`) and `close()` (leaving it),
  False before and after: what the conformance suite checks an adapter's lifetime by.
  Nothing else depends on it: a memory adapter also works when never entered.
"""

from __future__ import annotations


class Lifetime:
    is_open = False

    async def open(self) -> None:
        self.is_open = True

    async def close(self) -> None:
        self.is_open = False
