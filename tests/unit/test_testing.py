"""MemorySessionStore keeps the Redis store's semantics."""

from __future__ import annotations

import asyncio

import pytest

from authz.core.session import Evidence, Grant
from authz.errors import StoreError
from authz.testing import MemorySessionStore


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def grant(level: str, now: int, ttl: int) -> Grant:
    return Grant(level, Evidence("mfa", ("otp",), now), expires_at=now + ttl, issued_at=now)


async def test_grants_expire_on_the_clock() -> None:
    clock = Clock()
    store = MemorySessionStore(clock)
    now = int(clock.t)
    await store.write_grant("s", grant("high", now, 60), now)
    await store.write_grant("s", grant("standard", now, 600), now)
    assert [g.level for g in (await store.read("s", ["standard", "high", "x"])).grants] == [
        "standard",
        "high",
    ]
    clock.t += 60
    assert [g.level for g in (await store.read("s", ["standard", "high"])).grants] == ["standard"]
    assert (await store.read("other", ["standard"])).grants == ()


async def test_expired_grant_refused_and_revoke() -> None:
    clock = Clock()
    store = MemorySessionStore(clock)
    now = int(clock.t)
    with pytest.raises(ValueError, match="expired"):
        await store.write_grant("s", grant("high", now, 0), now)
    await store.write_grant("s", grant("high", now, 10), now)
    assert await store.revoke_session("s", ["high", "standard"]) == 1
    assert (await store.read("s", ["high"])).grants == ()


async def test_state_one_time_nx_and_ttl() -> None:
    clock = Clock()
    store = MemorySessionStore(clock)
    payload = {"nonce": "n", "nested": {"a": [1, 2]}}
    await store.put_state("id", payload, 30)
    with pytest.raises(StoreError):
        await store.put_state("id", {"nonce": "other"}, 30)
    payload["nonce"] = "mutated after put"
    assert await store.take_state("id") == {"nonce": "n", "nested": {"a": [1, 2]}}
    assert await store.take_state("id") is None

    await store.put_state("old", {"x": 1}, 30)
    clock.t += 30
    assert await store.take_state("old") is None
    await store.put_state("old", {"x": 2}, 30)  # an expired id may be reused, as in Redis
    with pytest.raises(TypeError):
        await store.put_state("bad", {"x": object()}, 30)


async def test_concurrent_take_has_one_winner() -> None:
    store = MemorySessionStore(Clock())
    await store.put_state("race", {"n": 1}, 60)
    results = await asyncio.gather(*(store.take_state("race") for _ in range(20)))
    assert [r for r in results if r is not None] == [{"n": 1}]


async def test_fail_switch() -> None:
    clock = Clock()
    store = MemorySessionStore(clock, fail=True)
    now = int(clock.t)
    with pytest.raises(StoreError):
        await store.read("s", ["high"])
    with pytest.raises(StoreError):
        await store.write_grant("s", grant("high", now, 10), now)
    with pytest.raises(StoreError):
        await store.put_state("id", {}, 10)
    with pytest.raises(StoreError):
        await store.take_state("id")
    with pytest.raises(StoreError):
        await store.revoke_session("s", ["high"])
    assert await store.ping() is False
    store.fail = False
    assert await store.ping() is True
    assert (await store.read("s", ["high"])).grants == ()
    await store.aclose()
    assert store.closed
