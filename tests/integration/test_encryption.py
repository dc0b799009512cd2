"""Encryption at rest and in transit, against a real Redis.

- After a realistic sequence (step-up state stored, grant bound to a device and IP, an
  allow with a GeoIP sighting) every key the store wrote is read back the way an operator
  with ``redis-cli`` would (SCAN, TYPE, GET / HGETALL): no device id, IP, nonce, PKCE
  verifier, return path or coordinate appears anywhere, in key names, fields or values.
- Key rotation through the real store: written under kid A, read with B active and A in
  the ring; known devices found through ``previous_kid`` and moved to B when seen again.
- Binding still works on decrypted grants; read_check is still one round trip.
- ``rediss://`` with CA verification against a TLS-only redis-server with generated certs.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from authz.config.settings import RedisSettings
from authz.core.decision import honoured_here
from authz.core.policy import Level
from authz.core.session import Evidence, Grant, UserState, session_key, user_key
from authz.store.connections import EmbeddedValkey, make_client
from authz.store.crypto import FieldCipher
from authz.store.sessions import RedisSessionStore
from tests.tlsutil import tls_redis_server

pytestmark = pytest.mark.integration

DEADLINE_MS = 2000
UK = user_key("https://idp.example", "alice")
SK = session_key("https://idp.example", "alice", "sid-1")
SK2 = session_key("https://idp.example", "alice", "sid-2")
LEVELS = ["standard", "elevated", "high"]
DEVICE = "cookie:Zq3vXo9T1bWm4kPp8sLr2cYd"
OTHER_DEVICE = "mdm:7f3a9c1e-0b2d-4e5f-8a6b-1c2d3e4f5a6b"
IP = "203.0.113.77"
LAT, LON = 40.7128, -74.006
KA, KB = os.urandom(32), os.urandom(32)
HIGH = Level(
    name="high",
    rank=2,
    public=False,
    acr=frozenset({"phr"}),
    amr_any=frozenset(),
    max_age=300,
    grant_ttl=None,
    bind_device=True,
    bind_ip=True,
)


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


def grant(level: str, now: int, device: str | None = DEVICE, ip: str | None = IP) -> Grant:
    return Grant(
        level=level,
        evidence=Evidence(acr="phr", amr=("hwk",), auth_time=now - 5),
        expires_at=now + 600,
        issued_at=now,
        device=device,
        ip=ip,
    )


def store_for(
    url: str, prefix: str, cipher: FieldCipher | None = None, corrupt: Counter | None = None
) -> RedisSessionStore:
    return RedisSessionStore(
        make_client(url, RedisSettings()),
        prefix=prefix,
        deadline_ms=DEADLINE_MS,
        cipher=cipher,
        on_corrupt=corrupt,
    )


async def read(
    store: RedisSessionStore,
    now: int,
    device: str | None = DEVICE,
    ip: str | None = IP,
    session: str = SK,
) -> UserState:
    return await store.read_check(
        user=UK,
        session=session,
        levels=LEVELS,
        level="high",
        device=device,
        ip=ip,
        sensitive=True,
        window_s=60,
        now=now,
    )


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def get(raw: aioredis.Redis, key: str) -> bytes:
    value: Any = await raw.get(key)  # bytes | None (no decode_responses)
    return bytes(value or b"")


async def dump(raw: aioredis.Redis, prefix: str) -> tuple[bytes, set[str]]:
    """Everything under ``prefix`` as redis-cli shows it: key names, hash fields, values."""
    chunks: list[bytes] = []
    types: set[str] = set()
    async for key in raw.scan_iter(match=f"{prefix}*", count=1000):
        kind_raw: Any = await raw.type(key)
        kind = kind_raw.decode()
        types.add(kind)
        chunks.append(key)
        if kind == "string":
            chunks.append(await get(raw, key))
        elif kind == "hash":
            fields: Any = await raw.hgetall(key)
            for field, value in fields.items():
                chunks += [field, value]
        else:
            raise AssertionError(f"unexpected {kind} key {key!r}")
    return b"\n".join(chunks), types


async def test_nothing_sensitive_is_readable_with_redis_cli(
    redis_url: str, redis_prefix: str, raw: aioredis.Redis
) -> None:
    now = int(time.time())
    store = store_for(redis_url, redis_prefix, FieldCipher({"k1": KA}, "k1"))
    state: dict[str, object] = {
        "kind": "stepup",
        "rd": "/accounts/98765/wires?amount=250000",
        "level": "high",
        "uk": UK,
        "sk": SK,
        "sub": "alice",
        "device": DEVICE,
        "ip": IP,
        "nonce": "n0nce-Gq8vT2pXwLz4",
        "verifier": "pkce-Verifier-7hJ2kQ9mN4bV6cX1zR8t",
        "iat": now,
    }
    try:
        await store.put_state("state-id-Kp9rT3", state, 300)
        await store.write_grant(UK, SK, grant("high", now), now)
        await store.note_allow(
            user=UK, session=SK2, level="standard", ip=IP, device=None, now=now + 1
        )
        await store.note_allow(
            user=UK, session=SK, level="high", ip=IP, device=DEVICE, now=now + 2, lat=LAT, lon=LON
        )
        s = await read(store, now + 3)

        everything, types = await dump(raw, redis_prefix)
        assert types == {"string", "hash"}
        needles = [
            DEVICE,
            DEVICE.split(":")[1],
            IP,
            "203.0.113",
            str(state["nonce"]),
            str(state["verifier"]),
            str(state["rd"]),
            "/accounts/98765",
            "state-id-Kp9rT3",
            repr(LAT),
            repr(LON),
            "40.71",
            "74.00",
            "alice",
        ]
        for needle in needles:
            assert needle.encode() not in everything, needle
        # ... while the service still sees all of it.
        assert s.grants == (grant("high", now),)
        assert (s.device_known, s.ip_known) == (True, True)
        last = s.last_seen
        assert last is not None
        assert (last.ip, last.lat, last.lon) == (IP, LAT, LON)
        listed = {i.session: (i.ip, i.device) for i in await store.list_sessions(UK)}
        assert listed == {SK: (IP, DEVICE), SK2: (IP, None)}
        assert await store.take_state("state-id-Kp9rT3") == state
    finally:
        await store.aclose()


async def test_binding_on_decrypted_grants(redis_url: str, redis_prefix: str) -> None:
    """A grant bound to device D (and its IP) is honoured for D, refused for E."""
    now = int(time.time())
    store = store_for(redis_url, redis_prefix)
    try:
        await store.write_grant(UK, SK, grant("high", now), now)
        here = await read(store, now)
        (g,) = here.grants
        assert honoured_here(HIGH, g, DEVICE, IP)
        assert not honoured_here(HIGH, g, OTHER_DEVICE, IP)
        assert not honoured_here(HIGH, g, DEVICE, "198.51.100.1")
        assert not honoured_here(HIGH, g, None, IP)
        elsewhere = await read(store, now, device=OTHER_DEVICE)
        assert elsewhere.device_known is False
    finally:
        await store.aclose()


async def test_moved_or_forged_values_are_corrupt_never_evidence(
    redis_url: str, redis_prefix: str, raw: aioredis.Redis
) -> None:
    now = int(time.time())
    corrupt = Counter()
    store = store_for(redis_url, redis_prefix, corrupt=corrupt)
    k = store.keys(UK)
    try:
        await store.write_grant(UK, SK, grant("standard", now, device=None, ip=None), now)
        sealed = await get(raw, k.grant(SK, "standard"))
        # Copied to another session and to a stronger level of the same session.
        await raw.set(k.grant(SK2, "high"), sealed)
        await raw.set(k.grant(SK, "high"), sealed)
        # A plaintext grant, as anyone with write access to Redis could craft.
        await raw.set(
            k.grant(SK, "elevated"),
            b'{"v":1,"level":"elevated","acr":"phr",'
            b'"amr":["hwk"],"auth_time":1,"exp":9999999999,"iat":1}',
        )
        assert [g.level for g in (await read(store, now)).grants] == ["standard"]
        assert (await read(store, now, session=SK2)).grants == ()
        assert corrupt.n == 3
        # Another process's key (e.g. a replica without the shared key): all corrupt.
        stranger = store_for(redis_url, redis_prefix, corrupt=corrupt)
        try:
            assert (await read(stranger, now)).grants == ()
        finally:
            await stranger.aclose()
        assert corrupt.n == 6
    finally:
        await store.aclose()


async def test_rotation_through_the_store(
    redis_url: str, redis_prefix: str, raw: aioredis.Redis
) -> None:
    now = int(time.time())
    corrupt = Counter()
    old = store_for(redis_url, redis_prefix, FieldCipher({"a": KA}, "a"), corrupt)
    rotated = store_for(
        redis_url, redis_prefix, FieldCipher({"a": KA, "b": KB}, "b", previous_kid="a"), corrupt
    )
    forgetful = store_for(redis_url, redis_prefix, FieldCipher({"a": KA, "b": KB}, "b"), corrupt)
    retired = store_for(redis_url, redis_prefix, FieldCipher({"b": KB}, "b"), corrupt)
    k = old.keys(UK)
    try:
        await old.put_state("st", {"nonce": "n", "verifier": "v"}, 60)
        await old.write_grant(UK, SK, grant("high", now), now)
        await old.note_allow(
            user=UK, session=SK, level="high", ip=IP, device=DEVICE, now=now, lat=LAT, lon=LON
        )
        assert (await get(raw, k.grant(SK, "high"))).startswith(b"v1.a.")

        # B active, A still in the ring: everything written under A reads.
        s = await read(rotated, now)
        assert s.grants == (grant("high", now),)
        assert (s.device_known, s.ip_known) == (True, True)
        assert s.last_seen is not None and s.last_seen.ip == IP
        assert await rotated.take_state("st") == {"nonce": "n", "verifier": "v"}
        assert (await rotated.list_sessions(UK))[0].device == DEVICE
        # Without previous_kid the lookup key changed: known devices are forgotten.
        f = await read(forgetful, now)
        assert (f.device_known, f.ip_known) == (False, False)
        assert corrupt.n == 0

        # Seen again under B: the known device / IP move to B's fingerprints, new values
        # are written under B.
        await rotated.note_allow(
            user=UK, session=SK, level="high", ip=IP, device=DEVICE, now=now + 1
        )
        b = rotated.cipher
        assert await raw.hkeys(k.devices) == [b.fingerprint("device", UK, DEVICE).encode()]
        assert await raw.hkeys(k.ips) == [b.fingerprint("ip", UK, IP).encode()]
        assert (await get(raw, k.last_sighting)).startswith(b"v1.b.")
        r = await read(retired, now + 1)
        assert (r.device_known, r.ip_known) == (True, True)
        # The grant written under A is unreadable once A leaves the ring: corrupt, a deny.
        assert r.grants == ()
        assert corrupt.n == 1
        # A new grant under B replaces any A-fingerprinted entry instead of duplicating it.
        await old.write_grant(UK, SK2, grant("elevated", now), now)
        await rotated.write_grant(UK, SK2, grant("elevated", now + 2), now + 2)
        assert len(await raw.hkeys(k.devices)) == 1
    finally:
        for s_ in (old, rotated, forgetful, retired):
            await s_.aclose()


async def test_read_check_is_still_one_round_trip(embedded_valkey: EmbeddedValkey) -> None:
    cipher = FieldCipher({"a": KA, "b": KB}, "b", previous_kid="a")
    store = store_for(embedded_valkey.url, "t:", cipher)
    admin = aioredis.Redis.from_url(embedded_valkey.url, decode_responses=True)
    try:
        now = int(time.time())
        await store.write_grant(UK, SK, grant("high", now), now)
        await read(store, now)  # warm up the connection and the script

        async def counts() -> dict[str, int]:
            stats = await admin.info("commandstats")
            return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}

        before = await counts()
        state = await read(store, now)
        after = await counts()
        delta = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
        delta.pop("info")
        assert delta["evalsha"] == 1 and "eval" not in delta
        assert delta["hexists"] == 3  # known under the active kid: no second lookup
        assert len(state.grants) == 1
    finally:
        await admin.aclose()
        await store.aclose()


# --- rediss:// with CA verification ----------------------------------------------------------


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """A TLS-only redis-server child on loopback: (port, the CA that
    signed its certificate (for 127.0.0.1 and redis.test), an unrelated CA)."""
    with tls_redis_server(tmp_path / "tls-redis") as srv:
        yield srv.port, srv.ca, srv.other_ca


async def test_rediss_verifies_the_server_against_the_ca(
    tls_redis: tuple[int, Path, Path],
) -> None:
    port, ca, other = tls_redis
    good = make_client(f"rediss://127.0.0.1:{port}", RedisSettings(ca_file=ca))
    wrong_ca = make_client(f"rediss://127.0.0.1:{port}", RedisSettings(ca_file=other))
    plain = make_client(f"redis://127.0.0.1:{port}", RedisSettings())
    try:
        assert await good.ping() is True
        store = RedisSessionStore(good, prefix="t:", deadline_ms=DEADLINE_MS)
        now = int(time.time())
        await store.write_grant(UK, SK, grant("high", now), now)
        assert len((await read(store, now)).grants) == 1
        with pytest.raises(RedisConnectionError, match=r"(?i)certificate verify failed"):
            await wrong_ca.ping()
        with pytest.raises((RedisConnectionError, OSError, asyncio.TimeoutError)):
            await plain.ping()  # no cleartext port at all
    finally:
        for c in (good, wrong_ca, plain):
            await c.aclose()


async def test_rediss_checks_the_host_name(tls_redis: tuple[int, Path, Path]) -> None:
    port, ca, _ = tls_redis
    # The right CA, but the certificate names redis.test and 127.0.0.1, not localhost.
    client = make_client(f"rediss://localhost:{port}", RedisSettings(ca_file=ca))
    try:
        with pytest.raises(RedisConnectionError, match=r"(?i)mismatch|not valid for"):
            await client.ping()
    finally:
        await client.aclose()
