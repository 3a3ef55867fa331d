"""Hint buses: "workspace X changed, look again", at most once.

Guarantees (both buses):
- `publish` never raises because the bus is down and never takes longer than about
  `publish_timeout` seconds (an API call or wake-up that publishes is not held up by a
  Redis outage); a lost hint only costs latency, because
  every subscriber resyncs after each (re)subscription and periodically.
- `subscribe` yields None first and after every reconnection ("you may have missed hints:
  resync"), then workspace ids as they arrive. It reconnects by itself after an outage,
  retrying with capped exponential backoff (`retry_delay` doubling up to `retry_max`),
  and logs the outage once when it starts and once when it ends, however long it lasts.

InProcessHintBus is the embedded default (one replica); RedisHintBus uses pub/sub on
`constants.HINT_CHANNEL` so every replica hears every hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import constants
from .interfaces import HintBus

log = logging.getLogger(__name__)

_QUEUE_BOUND = 10_000  # a subscriber this far behind drops hints and is told to resync


class InProcessHintBus(HintBus):
    """Fan-out to the subscribers of this process."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[str | None]] = set()

    async def publish(self, workspace_id: str) -> None:
        for q in self._subscribers:
            try:
                q.put_nowait(workspace_id)
            except asyncio.QueueFull:
                _drain(q)
                q.put_nowait(None)

    async def subscribe(self) -> AsyncIterator[str | None]:
        q: asyncio.Queue[str | None] = asyncio.Queue(_QUEUE_BOUND)
        self._subscribers.add(q)
        try:
            yield None
            while True:
                yield await q.get()
        finally:
            self._subscribers.discard(q)


def _drain(q: asyncio.Queue[str | None]) -> None:
    while not q.empty():
        q.get_nowait()


class RedisHintBus(HintBus):
    """Redis pub/sub. An outage is logged once when it starts and once when it ends."""

    def __init__(self, url: str, *, channel: str = constants.HINT_CHANNEL,
                 retry_delay: float = 0.5, retry_max: float = 4.0,
                 publish_timeout: float = 1.0) -> None:
        self.url = url
        self.channel = channel
        self.retry_delay = retry_delay
        self.retry_max = retry_max
        self.publish_timeout = publish_timeout
        # No retries with backoff inside redis-py (its default sleeps up to 10 s per call):
        # publish retries once itself, subscribe has its own backoff loop.
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=10,
            retry=Retry(NoBackoff(), 0))
        self._publish_down = False

    async def close(self) -> None:
        await self._client.aclose()

    async def ping(self, timeout: float = 5.0) -> bool:
        try:
            async with asyncio.timeout(timeout):
                return bool(await self._client.ping())
        except (RedisError, OSError):  # TimeoutError included
            return False

    async def publish(self, workspace_id: str) -> None:
        try:
            async with asyncio.timeout(self.publish_timeout):
                try:
                    await self._client.publish(self.channel, workspace_id)
                except (RedisConnectionError, RedisTimeoutError, ConnectionError):
                    # a pooled connection that died with an outage fails once; a new one
                    # may not
                    await self._client.publish(self.channel, workspace_id)
        except (RedisError, OSError) as exc:  # TimeoutError included
            if not self._publish_down:
                log.warning("redis unreachable, hints are being dropped (resync covers them): %s",
                            exc)
                self._publish_down = True
            return
        if self._publish_down:
            log.info("redis reachable again, hints flow")
            self._publish_down = False

    async def subscribe(self) -> AsyncIterator[str | None]:
        down = False
        delay = self.retry_delay
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if down:
                    log.info("redis subscription restored")
                    down = False
                delay = self.retry_delay
                yield None
                while True:
                    msg = await pubsub.get_message(timeout=None)
                    if msg is not None and msg["type"] == "message":
                        data = msg["data"]
                        yield data.decode() if isinstance(data, bytes) else str(data)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if not down:
                    log.warning("redis subscription lost, relying on resync: %s", exc)
                    down = True
                # Every pooled connection predates the outage: drop them all, or the next
                # subscription may ride on a dead socket and be "lost" once more.
                with contextlib.suppress(RedisError, OSError):
                    await self._client.connection_pool.disconnect()
            finally:
                with contextlib.suppress(RedisError, OSError):
                    # older redis releases leave it untyped (hence the ignore); 8.2 types it
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)
