"""The conformance suite for every ObjectStore: each check of object_checks.py
becomes one test named after its guarantee, run once per implementation (`object_kit`'s
parameters: conftest.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from conformance_kits import ObjectKit
from object_checks import CHECKS

pytestmark = pytest.mark.timeout(300)


Check = Callable[[ObjectKit], Awaitable[None]]


def _as_test(check: Check) -> Check:
    async def test(object_kit: ObjectKit) -> None:
        await check(object_kit)

    test.__name__ = "test_" + check.__name__.removeprefix("check_")
    test.__doc__ = check.__doc__
    return test


globals().update({t.__name__: t for t in map(_as_test, CHECKS)})
