"""Process limits and allocator settings set at start-up.

Guarantees:
- `raise_nofile()` raises the soft RLIMIT_NOFILE to the hard limit (every connection,
  relayed WebSocket and upstream socket costs a descriptor; the usual soft default of
  1024 caps the gateway at a few hundred users), and logs a warning naming the limit when
  the hard limit is below `LOW_NOFILE`. It never fails the start: where the limit cannot
  be changed it logs why and goes on.
- `pin_mmap_threshold()` (glibc only; elsewhere a no-op returning False) fixes malloc's
  mmap threshold at `MMAP_THRESHOLD`: every larger block (an archive's 1 MiB chunks, its
  16 MiB upload parts) is mapped on its own and unmapped when freed. glibc otherwise
  raises the threshold after the first such free and serves the next ones from the heap,
  where they fragment: archiving 2 GiB peaked 53 MiB above the start RSS with the
  dynamic threshold and 37 MiB with this one (two parts in flight are 32 MiB). Blocks
  below it, among them every buffer of the proxy's hot path (64 KiB at most), are
  allocated as before.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import resource

log = logging.getLogger(__name__)

LOW_NOFILE = 65536
MMAP_THRESHOLD = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def raise_nofile() -> int:
    """Raise the soft descriptor limit to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s",
                        soft, target, exc)
    if soft < LOW_NOFILE:
        log.warning("open-files limit is %d (hard limit %s): it caps concurrent client "
                    "connections, relayed WebSockets and upstream sockets together at about "
                    "that many; raise the hard limit (ulimit -Hn, LimitNOFILE=) to at least %d",
                    soft, "unlimited" if hard == resource.RLIM_INFINITY else hard, LOW_NOFILE)
    else:
        log.info("open-files limit: %d", soft)
    return soft


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD; whether it is in force now."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError) as exc:
        log.warning("could not fix the malloc mmap threshold: %s", exc)
        return False
    if not done:
        log.warning("mallopt refused the mmap threshold %d", MMAP_THRESHOLD)
    return done
