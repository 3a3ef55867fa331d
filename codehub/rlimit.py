"""Process limits set at start-up.

Guarantees:
- `raise_nofile()` raises the soft RLIMIT_NOFILE to the hard limit (every connection,
  relayed WebSocket and upstream socket costs a descriptor; the usual soft default of
  1024 caps the gateway at a few hundred users), and logs a warning naming the limit when
  the hard limit is below `LOW_NOFILE`. It never fails the start: where the limit cannot
  be changed it logs why and goes on.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

LOW_NOFILE = 65536


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
