"""MemorySessionStore keeps the Redis store's semantics (see also the parity test in
tests/integration/test_sessions.py, which runs one scenario against both)."""

from __future__ import annotations

import asyncio

import pytest

from authz.core.session import Evidence, Grant, Sighting, UserState, device_tag
from authz.errors import StoreError
from authz.store.memory import MemorySessionStore
from authz.store.sessions import StoreLimits

UK, SK, SK2 = "u1", "s1", "s2"
LEVELS = ("standard", "elevated", "high")


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def grant(
    level: str, now: int, ttl: int, device: str | None = None, ip: str | None = None
) -> Grant:
    return Grant(
        level,
        Evidence("mfa", ("otp",), now),
        expires_at=now + ttl,
        issued_at=now,
        device=device,
        ip=ip,
    )


async def read(
    store: MemorySessionStore,
    now: int,
    *,
    session: str = SK,
    level: str = "high",
    device: str | None = None,
    ip: str | None = None,
    sensitive: bool = False,
    window_s: int = 60,
) -> UserState:
    return await store.read_check(
        user=UK,
        session=session,
        levels=LEVELS,
        level=level,
        device=device,
        ip=ip,
        sensitive=sensitive,
        window_s=window_s,
        now=now,
    )


async def test_grants_expire_on_the_clock() -> None:
    clock = Clock()
    store = MemorySessionStore(clock)
    now = int(clock.t)
    await store.write_grant(UK, SK, grant("high", now, 60), now)
    await store.write_grant(UK, SK, grant("standard", now, 600), now)
    assert [g.level for g in (await read(store, now)).grants] == ["standard", "high"]
    clock.t += 60
    assert [g.level for g in (await read(store, now)).grants] == ["standard"]
    assert (await read(store, now, session=SK2)).grants == ()
    assert store.calls == 5


async def test_expired_grant_refused() -> None:
    clock = Clock()
    store = MemorySessionStore(clock)
    now = int(clock.t)
    with pytest.raises(ValueError, match="expired"):
        await store.write_grant(UK, SK, grant("high", now, 0), now)
    assert store.calls == 0


async def test_known_device_ip_level_seen_and_sighting() -> None:
    clock = Clock()
    store = MemorySessionStore(clock)
    now = int(clock.t)
    s = await read(store, now, device="d1", ip="192.0.2.1")
    assert s == UserState(device_known=False, ip_known=False, level_seen=False)
    await store.write_grant(UK, SK, grant("high", now, 60, "d1", "192.0.2.1"), now)
    await store.note_allow(
        user=UK, session=SK, level="high", ip="192.0.2.1", device="d1", now=now, lat=1.5, lon=2.5
    )
    s = await read(store, now, device="d1", ip="192.0.2.2")
    assert (s.device_known, s.ip_known, s.level_seen) == (True, False, True)
    assert s.last_seen == Sighting(now, "192.0.2.1", 1.5, 2.5, SK, device_tag("d1"))
    assert (await read(store, now)).device_known is None
    # note_allow never teaches a device: only a grant does.
    await store.note_allow(user=UK, session=SK, level="high", ip="192.0.2.9", device="d9", now=now)
    assert (await read(store, now, device="d9", ip="192.0.2.9")).device_known is False


async def test_bounded_lists_evict_the_oldest() -> None:
    clock = Clock()
    store = MemorySessionStore(clock, limits=StoreLimits(max_devices=2, max_ips=2, max_sessions=2))
    now = int(clock.t)
    for i in range(4):
        await store.write_grant(UK, f"s{i}", grant("high", now + i, 60, f"d{i}", f"ip{i}"), now + i)
    known = [(await read(store, now, device=f"d{i}")).device_known for i in range(4)]
    assert known == [False, False, True, True]
    assert [s.session for s in await store.list_sessions(UK)] == ["s3", "s2"]


async def test_velocity_sliding_window() -> None:
    store = MemorySessionStore(Clock())
    t0 = 1_800_000_000 // 60 * 60
    assert [(await read(store, t0 + 1, sensitive=True)).velocity for _ in range(4)] == [1, 2, 3, 4]
    assert (await read(store, t0 + 2)).velocity == 0
    assert (await read(store, t0 + 60 + 30, sensitive=True)).velocity == 3  # 4*0.5 + 1


async def test_revocations() -> None:
    clock = Clock()
    store = MemorySessionStore(clock)
    now = int(clock.t)
    await store.write_grant(UK, SK, grant("high", now, 60), now)
    await store.write_grant(UK, SK2, grant("high", now, 60), now)
    assert await store.revoke_session(UK, SK, now) is True
    s = await read(store, now)
    assert (s.session_revoked, s.grants) == (True, ())
    assert await store.revoke_session(UK, SK, now) is False
    assert await store.revoke_user(UK, now + 1) == 1
    s = await read(store, now, session=SK2)
    assert (s.revoked_before, s.grants) == (now + 1, ())
    await store.write_grant(UK, SK2, grant("high", now + 2, 60), now + 2)
    assert [g.level for g in (await read(store, now, session=SK2)).grants] == ["high"]
    clock.t += StoreLimits().revocation_ttl_s
    s = await read(store, now)
    assert (s.session_revoked, s.revoked_before) == (False, None)


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
        await read(store, now)
    with pytest.raises(StoreError):
        await store.write_grant(UK, SK, grant("high", now, 10), now)
    with pytest.raises(StoreError):
        await store.note_allow(user=UK, session=SK, level="high", ip=None, device=None, now=now)
    with pytest.raises(StoreError):
        await store.put_state("id", {}, 10)
    with pytest.raises(StoreError):
        await store.take_state("id")
    with pytest.raises(StoreError):
        await store.revoke_session(UK, SK, now)
    with pytest.raises(StoreError):
        await store.revoke_user(UK, now)
    with pytest.raises(StoreError):
        await store.list_sessions(UK)
    assert await store.ping() is False
    store.fail = False
    assert await store.ping() is True
    assert (await read(store, now)).grants == ()
    await store.aclose()
    assert store.closed
