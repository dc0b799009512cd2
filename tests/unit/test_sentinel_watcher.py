"""SentinelWatcher with stand-ins for the sentinels (the real thing: tests/ha)."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from authz.store.connections import SentinelWatcher


class FakePubSub:
    def __init__(self, messages: list[Any], fail: bool) -> None:
        self.messages, self.fail, self.closed = messages, fail, False

    async def subscribe(self, channel: str) -> None:
        assert channel == "+switch-master"
        if self.fail:
            raise RedisConnectionError("sentinel down")

    async def get_message(self, ignore_subscribe_messages: bool, timeout: float) -> Any:  # noqa: ASYNC109 - redis-py's signature
        if self.messages:
            return {"type": "message", "data": self.messages.pop(0)}
        await asyncio.sleep(timeout)  # as redis-py: wait up to `timeout` (the watcher's poll_s)
        return None

    async def aclose(self) -> None:
        self.closed = True


class FakeSentinel:
    def __init__(self, messages: list[Any], *, fail: bool = False) -> None:
        self.messages, self.fail, self.pubsubs = messages, fail, []

    def pubsub(self) -> FakePubSub:
        p = FakePubSub(self.messages, self.fail)
        self.pubsubs.append(p)
        return p


class FakePool:
    def __init__(self, sentinels: list[FakeSentinel]) -> None:
        self.sentinel_manager = type("M", (), {"sentinels": sentinels})()
        self.disconnects: list[bool] = []
        self.disconnected = asyncio.Event()

    async def disconnect(self, inuse_connections: bool = True) -> None:
        self.disconnects.append(inuse_connections)
        self.disconnected.set()


async def test_a_switch_of_our_primary_drops_every_connection_others_are_ignored() -> None:
    down = FakeSentinel([], fail=True)  # the first sentinel is down: the next one is used
    up = FakeSentinel(
        [b"other 10.0.0.1 6379 10.0.0.2 6379", b"mymaster 10.0.0.1 6379 10.0.0.3 6379"]
    )
    pool = FakePool([down, up])
    watcher = SentinelWatcher(
        type("C", (), {"connection_pool": pool})(), "mymaster", poll_s=0.01, retry_s=0.01
    )
    watcher.start()
    await asyncio.wait_for(pool.disconnected.wait(), 10)
    await watcher.aclose()
    assert watcher.switches == 1
    assert pool.disconnects == [True]  # in-use connections too: they point at the old primary
    assert down.pubsubs and all(p.closed for p in down.pubsubs)
