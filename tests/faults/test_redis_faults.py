"""Redis faults against the running service (in-process, real gRPC, a private real Valkey).

Each test states its expected safe outcome. "Fails closed" means: not allowed, 403, reason
``session-store-unavailable``, counted in ``fail_closed_total``; on a paused server, answered
while the server is still paused (so by the store deadline, not by Redis). That the answer
comes before Envoy's ext_authz timeout is shown through real Envoy in test_deadline.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis

from authz.store.connections import EmbeddedValkey
from authz.store.sessions import UserKeys
from tests.builders import FakeClock, async_wait_until
from tests.ha.harness import PUBLIC_PATH, SENSITIVE, STANDARD, Env, Result, service_env

pytestmark = pytest.mark.integration

FAIL = "session-store-unavailable"


@pytest.fixture
def valkey() -> AsyncIterator[EmbeddedValkey]:  # type: ignore[misc]
    server = EmbeddedValkey()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def env(valkey: EmbeddedValkey, tmp_path: Path) -> AsyncIterator[Env]:
    async with service_env(tmp_path, {"url": valkey.url}, {"audit": {"enabled": False}}) as e:
        yield e


@pytest.fixture
async def frozen_env(valkey: EmbeddedValkey, tmp_path: Path) -> AsyncIterator[Env]:
    """The service on a clock that does not move (from the time the test starts)."""
    async with service_env(
        tmp_path,
        {"url": valkey.url},
        {"audit": {"enabled": False}},
        clock=FakeClock(int(time.time())),
    ) as e:
        yield e


def raw(valkey: EmbeddedValkey) -> redis.Redis:
    return redis.Redis.from_url(valkey.url, socket_timeout=5)


def fail_closed(env: Env) -> float:
    return env.metric("stepup_authz_fail_closed_total", {"cause": FAIL})


async def assert_fails_closed(env: Env, token: str, path: str = SENSITIVE) -> None:
    before = fail_closed(env)
    r = await env.check(path, token)
    assert (r.allowed, r.status, r.reason) == (False, 403, FAIL), r
    assert fail_closed(env) == before + 1


async def test_redis_down_fails_closed_and_recovers(env: Env, valkey: EmbeddedValkey) -> None:
    alice = await env.token("alice")
    await env.grant(alice)
    assert (await env.check(SENSITIVE, alice)).allowed
    await asyncio.to_thread(valkey.stop)
    for path in (SENSITIVE, STANDARD):  # even a standard route reads the session state
        await assert_fails_closed(env, alice, path)
    await asyncio.to_thread(valkey.start)  # same port, empty (no persistence)
    seen: list[Result] = []

    async def answered_from_the_store() -> bool:
        seen.append(await env.check(SENSITIVE, alice))
        assert not seen[-1].allowed, seen[-1]  # never allowed while reconnecting
        return seen[-1].reason != FAIL

    await async_wait_until(answered_from_the_store, "the store to answer again")
    assert seen[-1].reason == "acr-insufficient", seen[-1]  # grant gone: step-up


async def readyz(env: Env) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(f"{env.http}/readyz") as r:
        return r.status, await r.text()


async def test_readiness_does_not_depend_on_redis(env: Env, valkey: EmbeddedValkey) -> None:
    """Redis down: /readyz stays 200 (the store reported down, in the body and the gauge),
    a public route is still allowed, a sensitive one fails closed; back up: reported ok."""
    alice = await env.token("alice")
    assert await readyz(env) == (200, "accepting: ok\nkeys: ok\npolicy: ok\nstore: ok\n")
    assert env.metric("stepup_authz_store_up") == 1
    await asyncio.to_thread(valkey.stop)
    status, body = await readyz(env)
    assert status == 200 and "store: down\n" in body, body
    assert env.metric("stepup_authz_store_up") == 0
    public = await env.check(PUBLIC_PATH)
    assert public.allowed and public.status == 200, public
    await assert_fails_closed(env, alice, SENSITIVE)
    await asyncio.to_thread(valkey.start)

    async def store_reported_up() -> bool:
        return (await readyz(env))[1].endswith("store: ok\n")

    await async_wait_until(store_reported_up, "the store to answer the probe again")
    assert env.metric("stepup_authz_store_up") == 1


async def test_redis_paused_answers_within_deadline_and_replies_never_cross(
    env: Env, valkey: EmbeddedValkey
) -> None:
    """CLIENT PAUSE beyond the deadline: every Check fails closed while the server is paused
    (alice has a grant: a Check that waited for Redis would allow her). A timed-out
    command's reply arrives later on its connection: it must never be read as the answer
    to another user's Check (the connection is dropped instead)."""
    alice, bob = await env.token("alice"), await env.token("bob")
    await env.grant(alice)
    c = raw(valkey)
    try:
        for _ in range(3):
            # Redis's own pause timer ends it (CLIENT UNPAUSE would wait behind the pause).
            c.execute_command("CLIENT", "PAUSE", 400, "ALL")  # type: ignore[no-untyped-call]
            results = await asyncio.gather(*(env.check(SENSITIVE, t) for t in [alice, bob] * 8))
            assert all((r.allowed, r.reason) == (False, FAIL) for r in results), results
            # Queued behind the Checks' commands: answered once the pause is over, when the
            # paused replies are on their way.
            assert await asyncio.to_thread(c.ping)
            results = await asyncio.gather(*(env.check(SENSITIVE, t) for t in [alice, bob] * 8))
            assert [r.allowed for r in results] == [True, False] * 8, results
            assert {r.reason for r in results[1::2]} == {"acr-insufficient"}
    finally:
        c.close()


async def test_readonly_replica_fails_closed(env: Env, valkey: EmbeddedValkey) -> None:
    """The server becomes a replica (as a demoted primary does): the Check's read-and-count
    hits READONLY and fails closed, even with a grant present; REPLICAOF NO ONE recovers."""
    alice = await env.token("alice")
    await env.grant(alice)
    with EmbeddedValkey() as other:
        c = raw(valkey)
        try:
            c.execute_command("REPLICAOF", "127.0.0.1", other.port)  # type: ignore[no-untyped-call]
            await assert_fails_closed(env, alice)
            c.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]
        finally:
            c.close()
    # A primary again: answered from the store (the grant survives unless a resync from
    # the empty primary completed first, in which case it is a step-up).
    r = await env.check(SENSITIVE, alice)
    assert r.allowed or r.reason == "acr-insufficient", r
    bob = await env.token("bob")
    assert (await env.check(SENSITIVE, bob)).reason == "acr-insufficient"


async def test_grant_expired_or_evicted_is_a_step_up(
    frozen_env: Env, valkey: EmbeddedValkey
) -> None:
    """The service's clock stands still here, so only Redis can end the grant: by its key's
    TTL (Redis's own timer, the subject: a real wait of about 1 s) or by eviction."""
    env = frozen_env
    alice = await env.token("alice")
    await env.grant(alice, ttl=1)
    assert (await env.check(SENSITIVE, alice)).allowed
    uk, sk = await env.keys(alice)
    grant_key = UserKeys(env.service.settings.redis.key_prefix, uk).grant(sk, "elevated")
    c = raw(valkey)
    try:
        await async_wait_until(lambda: not c.exists(grant_key), "Redis to expire the grant")
    finally:
        c.close()
    r = await env.check(SENSITIVE, alice)
    assert (r.allowed, r.reason) == (False, "acr-insufficient"), r
    # Eviction: a tiny maxmemory and a flood of other keys push the grant out.
    await env.grant(alice)
    assert (await env.check(SENSITIVE, alice)).allowed
    c = raw(valkey)
    try:
        c.config_set("maxmemory-policy", "allkeys-random")
        c.config_set("maxmemory", str(int(c.info("memory")["used_memory"]) + 200_000))
        i = 0
        while c.exists(grant_key):
            with c.pipeline(transaction=False) as p:
                for j in range(500):
                    p.set(f"filler:{i}:{j}", b"x" * 1000)
                p.execute()
            i += 1
            assert i < 200, "the grant was never evicted"
        r = await env.check(SENSITIVE, alice)
        assert (r.allowed, r.reason) == (False, "acr-insufficient"), r
        assert int(c.info("stats")["evicted_keys"]) > 0
    finally:
        c.config_set("maxmemory", "0")
        c.close()


async def test_corrupt_and_wrong_type_values(env: Env, valkey: EmbeddedValkey) -> None:
    """Junk or a wrong-type value at any per-user key: no crash, never an allow without a
    valid grant; junk is counted in ``corrupt_grants_total``."""
    alice = await env.token("alice")
    uk, sk = await env.keys(alice)
    k = UserKeys(env.service.settings.redis.key_prefix, uk)
    c = raw(valkey)
    corrupt = "stepup_authz_corrupt_grants_total"
    try:
        cases: list[tuple[str, str, object]] = [
            ("grant junk", k.grant(sk, "elevated"), b"\x00not json{"),
            (
                "grant wrong level",
                k.grant(sk, "elevated"),
                b'{"v":1,"level":"standard","acr":"mfa","amr":[],"auth_time":1,"exp":9999999999,'
                b'"iat":1}',
            ),
            (
                "grant plaintext forgery",
                k.grant(sk, "elevated"),
                b'{"v":1,"level":"elevated","acr":"mfa","amr":["otp"],"auth_time":%d,'
                b'"exp":9999999999,"iat":%d}' % (int(time.time()), int(time.time())),
            ),
            ("grant as hash", k.grant(sk, "elevated"), {"level": "elevated"}),
            ("revoked-before junk", k.revoked_before, b"yesterday"),
            ("velocity junk", k.velocity(int(time.time()) // 60), b"many"),
            ("velocity as list", k.velocity(int(time.time()) // 60), ["a"]),
            ("devices as string", k.devices, b"junk"),
            ("last sighting junk", k.last_sighting, b"1,2"),
        ]
        for name, key, value in cases:
            c.delete(key)
            if isinstance(value, dict):
                c.hset(key, mapping=value)
            elif isinstance(value, list):
                c.rpush(key, *value)
            else:
                c.set(key, value)  # type: ignore[arg-type]
            before = env.metric(corrupt)
            r = await env.check(SENSITIVE, alice)
            assert not r.allowed, (name, r)
            # An unreadable revocation marker revokes (fail closed): session-revoked.
            expected = (
                ("session-revoked",)
                if name == "revoked-before junk"
                else (
                    "acr-insufficient",
                    FAIL,
                )
            )
            assert r.reason in expected, (name, r)
            assert r.reason != "internal-error", name
            if name in (
                "grant junk",
                "grant wrong level",
                "grant plaintext forgery",
                "revoked-before junk",
                "velocity junk",
                "last sighting junk",
            ):
                assert env.metric(corrupt) > before, name
            c.delete(key)
        # And the valid grant still works after all that.
        await env.grant(alice)
        assert (await env.check(SENSITIVE, alice)).allowed
    finally:
        c.close()
