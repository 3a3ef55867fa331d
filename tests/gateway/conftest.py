"""Fixtures of the gateway tests (defined in gateway_support.py).

The gateway runs on uvloop in production (`codehub serve`), so its tests do too.
"""

from collections.abc import Callable, Mapping
from typing import Any

import uvloop
from gateway_support import echo_upstream, hosted, stack

__all__ = ["echo_upstream", "hosted", "stack"]


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}
