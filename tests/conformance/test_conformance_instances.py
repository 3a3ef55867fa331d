"""The conformance suite for every InstanceController: each check of instance_checks.py
becomes one test named after its guarantee, run once per implementation (`instance_kit`'s
parameters: conftest.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from conformance_kits import InstanceKit
from instance_checks import CHECKS

pytestmark = pytest.mark.timeout(300)


Check = Callable[[InstanceKit], Awaitable[None]]


def _as_test(check: Check) -> Check:
    async def test(instance_kit: InstanceKit) -> None:
        await check(instance_kit)

    test.__name__ = "test_" + check.__name__.removeprefix("check_")
    test.__doc__ = check.__doc__
    return test


globals().update({t.__name__: t for t in map(_as_test, CHECKS)})
