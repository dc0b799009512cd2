"""The service on a real three-primary Redis Cluster (from the server binaries), configured by
``redis.cluster``.

Expected safe outcomes:
- One user's keys share one hash slot (the ``{uk}`` tag), so the Check's single script runs on
  one node; a grant is honoured and its absence is a step-up.
- A live slot migration: the client follows MOVED; no request without a grant is allowed;
  the granted user is allowed again at once (the grant moved with its slot).
- The primary that owns a user's slot restarts (no replica, no persistence): while it is down
  the Check fails closed (``session-store-unavailable``); afterwards the grant is gone, so
  the answer is a step-up, never an allow; a new grant is honoured again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from authz.store.sessions import UserKeys
from tests.ha.cluster import ClusterSetup
from tests.ha.harness import SENSITIVE, Env, service_env
from tests.ha.load import Load

# Cluster start, resharding and failover wait on real redis-server processes (their own
# timers): longer than the default test timeout allows.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# Redis unreachable: the session read fails, or the audit-before-access write (same Redis).
FAIL_CLOSED = {"session-store-unavailable", "audit-unavailable"}


@pytest.fixture
async def env(cluster_setup: ClusterSetup, tmp_path: Path) -> AsyncIterator[Env]:
    await asyncio.to_thread(cluster_setup.wait_ok)
    redis = {"cluster": {"nodes": cluster_setup.nodes}, "key_prefix": f"ha:{tmp_path.name}:"}
    async with service_env(tmp_path, redis) as e:
        yield e


async def user_slot(env: Env, token: str) -> int:
    uk, sk = await env.keys(token)
    k = UserKeys(env.service.settings.redis.key_prefix, uk)
    names = [
        k.grant(sk, "elevated"),
        k.revoked(sk),
        k.revoked_before,
        k.sessions,
        k.devices,
        k.ips,
        k.levels_seen,
        k.last_sighting,
        k.velocity(1),
    ]
    slots = {key_slot(n.encode()) for n in names}
    assert len(slots) == 1, slots  # one slot: the script never spans nodes (no CROSSSLOT)
    return slots.pop()


async def test_checks_on_cluster(env: Env, cluster_setup: ClusterSetup) -> None:
    alice, bob = await env.token("alice"), await env.token("bob")
    await user_slot(env, alice)
    await env.grant(alice)
    assert (await env.check(SENSITIVE, alice)).allowed
    r = await env.check(SENSITIVE, bob)
    assert (r.allowed, r.status, r.reason) == (False, 401, "acr-insufficient"), r


async def test_slot_migration_follows_moved(env: Env, cluster_setup: ClusterSetup) -> None:
    alice, bob = await env.token("alice"), await env.token("bob")
    await env.grant(alice)
    slot = await user_slot(env, alice)
    load = Load(env, SENSITIVE, alice, bob, workers=4)
    load.start()
    try:
        await asyncio.sleep(0.5)
        src = await asyncio.to_thread(cluster_setup.owner, slot)
        dst = next(n for n in cluster_setup.primaries if n is not src)
        started = time.monotonic()
        await asyncio.to_thread(cluster_setup.migrate_slot, slot, dst)
        migrated = time.monotonic()
        assert (await asyncio.to_thread(cluster_setup.owner, slot)) is dst
        recovered = await load.wait_recovered(migrated, 10.0)
        await asyncio.sleep(0.5)
    finally:
        await load.stop()
    print(
        f"\n[cluster slot {slot} migrated in {migrated - started:.3f}s] recovered "
        f"{recovered:.3f}s after; {load.summary()}"
    )
    assert load.allowed_without_grant == 0, load.summary()
    # MOVED is an answer, not a failure: the grant moved with the slot and is still honoured.
    assert set(load.reasons(True)) <= FAIL_CLOSED, load.summary()
    assert set(load.reasons(False)) <= {"acr-insufficient", *FAIL_CLOSED}


async def test_primary_restart_fails_closed_then_steps_up(
    env: Env, cluster_setup: ClusterSetup, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = await env.token("alice"), await env.token("bob")
    await env.grant(alice)
    node = await asyncio.to_thread(cluster_setup.owner, await user_slot(env, alice))
    load = Load(env, SENSITIVE, alice, bob, workers=4)
    load.start()
    try:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(node.stop)
        stopped = time.monotonic()
        # Alice's slot has no live owner now (bob's keys may live on a node that is up). Each
        # granted worker may have had one request answered by the node before it stopped;
        # every later one fails closed (counted, not timed: a failover may stall a Check).
        in_flight = sum(1 for i in range(load.workers) if i % 2 == 0)
        down = (await load.granted_since(stopped, in_flight + 8, 20.0))[in_flight:]
        assert all(x.reason in FAIL_CLOSED for x in down), load.summary()
        started = time.monotonic()
        await asyncio.to_thread(node.start)  # same port, same nodes.conf, no data
        await asyncio.to_thread(cluster_setup.wait_ok)
        # Recovered: the store answers again, and with the grant gone that is a step-up.
        deadline = time.monotonic() + 20
        while True:
            r = await env.check(SENSITIVE, alice)
            if r.reason == "acr-insufficient":
                break
            assert not r.allowed and r.reason in FAIL_CLOSED, r
            assert time.monotonic() < deadline, "the service did not recover"
            await asyncio.sleep(0.05)
        back = time.monotonic() - started
    finally:
        await load.stop()
    print(
        f"\n[cluster primary restart] store answering {back:.2f}s after the restart; "
        f"{load.summary()}"
    )
    assert load.allowed_without_grant == 0, load.summary()
    # A slot with no live owner (SlotNotCoveredError, not a RedisError) and redis-py's async
    # cluster race while a node fails ('NoneType' ... 'writelines') are store failures too:
    # counted as such, never an unexplained internal error.
    escaped = [
        r.exc_text or r.getMessage()
        for r in caplog.records
        if r.name == "authz.check" and r.levelname == "ERROR"
    ]
    assert not escaped, (load.summary(), escaped[:2])
    assert (load.reasons(True) | load.reasons(False))["internal-error"] == 0, load.summary()
    await env.grant(alice)
    assert (await env.check(SENSITIVE, alice)).allowed
    r = await env.check(SENSITIVE, bob)
    assert (r.allowed, r.status, r.reason) == (False, 401, "acr-insufficient"), r
