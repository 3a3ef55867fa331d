"""Writing what a workspace should be: the one path the admin API and the self-service page
share for changing desired state and per-workspace settings.

Guarantees:
- No Docker or object storage is touched: the row is written and a hint published; the
  reconciler does the work.
- `change` checks the row with the caller's rule (model.desire_refusal, restore_refusal)
  and writes as a compare-and-set against exactly the row it checked (Store.update_spec);
  a row that moved in between is re-read and re-checked, up to `CAS_TRIES` times, then
  `KeptChanging`. Nothing to change: no write, no hint, no generation bump.
- Asking for a higher tier (model.TIER) restarts the idle time, so a restore or a wake is
  not swept straight back down.
- `delete` asks for DELETED once (idempotent: a workspace already asked keeps its row).
- An unknown workspace is `NotFound`; a refusal of the rule is `Refused`, carrying the
  model.Refusal unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .interfaces import HintBus
from .model import TIER, DesiredState, Refusal, Workspace
from .store import Store

CAS_TRIES = 5


class NotFound(LookupError):
    """No workspace with this id."""


class KeptChanging(RuntimeError):
    """The row moved under every one of CAS_TRIES attempts."""


class Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


Rule = Callable[[Workspace], Refusal | None]


async def load(store: Store, workspace_id: str) -> Workspace:
    ws = await store.get(workspace_id)
    if ws is None:
        raise NotFound(workspace_id)
    return ws


async def change(store: Store, hints: HintBus, workspace_id: str, rule: Rule,
                 desired: DesiredState | None, ttls: Mapping[str, int | None] | None = None,
                 ) -> tuple[Workspace, Workspace]:
    """(before, after); `after is before` when there was nothing to change."""
    ttls = dict(ttls or {})
    for _ in range(CAS_TRIES):
        ws = await load(store, workspace_id)
        refusal = rule(ws)
        if refusal is not None:
            raise Refused(refusal)
        same_ttls = all(getattr(ws, k) == v for k, v in ttls.items())
        if (desired is None or desired is ws.desired_state) and same_ttls:
            return ws, ws
        wake = desired is not None and TIER[desired] > TIER[ws.desired_state]
        new = await store.update_spec(
            workspace_id, expect_desired=ws.desired_state, expect_status=ws.status,
            expect_operation=ws.operation, desired_state=desired, ttls=ttls, touch=wake)
        if new is not None:
            await hints.publish(workspace_id)
            return ws, new
    raise KeptChanging(workspace_id)


async def delete(store: Store, hints: HintBus, workspace_id: str) -> Workspace:
    ws = await load(store, workspace_id)
    if ws.desired_state is DesiredState.DELETED:
        return ws
    new = await store.set_desired(ws.id, DesiredState.DELETED)
    if new is None:
        raise NotFound(workspace_id)
    await hints.publish(workspace_id)
    return new
