"""Named crash points for chaos tests.

Guarantee: when the environment variable CODEHUB_FAILPOINT names a point (a comma-separated
list may name several), the process kills itself with SIGKILL the first time it reaches that
point: no cleanup, no finally blocks, exactly as a power cut or an OOM kill would. Unarmed,
a failpoint costs one set lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "CODEHUB_FAILPOINT"

_armed: frozenset[str] = frozenset(
    p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip()
)


def failpoint(name: str) -> None:
    """Die here with SIGKILL if `name` is armed."""
    if name in _armed:
        os.kill(os.getpid(), signal.SIGKILL)


def arm(*names: str) -> None:
    """Arm failpoints in this process (tests that run the code in a child use ENV instead)."""
    global _armed
    _armed = _armed | frozenset(names)


def disarm() -> None:
    global _armed
    _armed = frozenset()
