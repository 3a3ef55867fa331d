"""The workspace credential at the gateway: checking a request's workspace cookies, and
the final checks of an access link before it is exchanged for one (handler.py answers).

Guarantees:
- `check_cookie` returns the first of the request's cookies that verifies (signing.py),
  else the most telling refusal (EXPIRED over INVALID; MISSING when none was sent). A
  cookie string seen valid before, for the same workspace and not yet expired, skips the
  HMAC (a bounded cache, cleared when full: the keys never change while running). It
  reads no database: the caller compares the nonce with the cached row's.
- `redeem` passes a verified link only while its nonce is the workspace row's (else
  REVOKED; no row: INVALID) and only the first time its link id is used (Store.use_link,
  shared by every replica; else USED).
- `cookie` mints the workspace cookie for a redeemed link's nonce, `cookie_ttl` long.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NamedTuple

from .. import signing
from ..signing import Credential, SigningKeys, Verdict
from ..store import Store
from .routes import RouteTable

VERIFIED_CACHE = 10_000


class _Verified(NamedTuple):
    workspace_id: str
    expiry: int
    credential: Credential


class Access:
    def __init__(self, keys: SigningKeys, store: Store, routes: RouteTable,
                 cookie_ttl: int) -> None:
        self.keys = keys
        self.store = store
        self.routes = routes
        self.cookie_ttl = cookie_ttl
        self._verified: dict[str, _Verified] = {}

    def check_cookie(self, workspace_id: str, values: list[str], now: float) -> Credential:
        worst = signing.MISSING
        for value in values:
            known = self._verified.get(value)
            if known is not None and known.expiry > now and known.workspace_id == workspace_id:
                return known.credential
            cred = signing.verify_cookie(self.keys, workspace_id, value, now)
            if cred.verdict is Verdict.OK:
                if len(self._verified) >= VERIFIED_CACHE:
                    self._verified.clear()
                self._verified[value] = _Verified(workspace_id, cred.expiry, cred)
                return cred
            if worst.verdict is Verdict.MISSING or cred.verdict is Verdict.EXPIRED:
                worst = cred
        return worst

    def verify_link(self, workspace_id: str, token: str, now: float) -> Credential:
        return signing.verify_access_link(self.keys, workspace_id, token, now)

    async def redeem(self, workspace_id: str, cred: Credential) -> Credential:
        ws = (await self.routes.get(workspace_id)).workspace
        if ws is None:
            return signing.INVALID
        if ws.access_nonce != cred.nonce:
            return Credential(Verdict.REVOKED)
        if not await self.store.use_link(cred.link_id, workspace_id,
                                         datetime.fromtimestamp(cred.expiry, UTC)):
            return Credential(Verdict.USED)
        return cred

    def cookie(self, workspace_id: str, nonce: str, now: float) -> str:
        return signing.mint_cookie(self.keys, workspace_id, nonce, self.cookie_ttl, now)
