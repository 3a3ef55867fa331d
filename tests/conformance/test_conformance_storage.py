"""The conformance suite for every StorageProvider: each check of storage_checks.py
becomes one test named after its guarantee, run once per implementation (`storage_kit`'s
parameters: conftest.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from conformance_kits import StorageKit
from storage_checks import CHECKS

pytestmark = pytest.mark.timeout(300)


Check = Callable[[StorageKit], Awaitable[None]]


def _as_test(check: Check) -> Check:
    async def test(storage_kit: StorageKit) -> None:
        await check(storage_kit)

    test.__name__ = "test_" + check.__name__.removeprefix("check_")
    test.__doc__ = check.__doc__
    return test


globals().update({t.__name__: t for t in map(_as_test, CHECKS)})
