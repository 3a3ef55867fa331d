"""Who a client is: the peer, or behind trusted proxies the client they forward for.

Guarantees:
- `trusted(remote)` is true only for a peer address inside one of
  gateway.trusted_proxies (never for a missing or malformed address); the answer is
  cached per address, the cache bounded (CACHE entries, then cleared).
- `client_address(fwd)` is the peer when it is not trusted; behind trusted proxies, the
  right-most X-Forwarded-For address that is not one of them (the first one when all
  are). The per-client limits (WebSockets, event streams) count by it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from .proxy import Forwarding

CACHE = 10_000


class Peers:
    def __init__(self, trusted_proxies: Sequence[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(n) for n in trusted_proxies)
        self._trusted: dict[str, bool] = {}

    def trusted(self, remote: str | None) -> bool:
        """Is the peer one of gateway.trusted_proxies? (cached per address)"""
        if not self._networks or not remote:
            return False
        known = self._trusted.get(remote)
        if known is None:
            try:
                address = ipaddress.ip_address(remote)
            except ValueError:
                known = False
            else:
                known = any(address in net for net in self._networks)
            if len(self._trusted) >= CACHE:
                self._trusted.clear()
            self._trusted[remote] = known
        return known

    def client_address(self, fwd: Forwarding) -> str:
        """Who the client is: the peer, or behind trusted proxies the right-most address
        of X-Forwarded-For that is not one of them."""
        if not fwd.trusted:
            return fwd.forwarded_for
        hops = [h.strip() for h in fwd.forwarded_for.split(",")]
        for hop in reversed(hops):
            if hop and not self.trusted(hop):
                return hop
        return hops[0]
