"""The service on a real Sentinel setup (primary, replica, three sentinels, from the server
binaries), configured by ``redis.sentinel``.

Expected safe outcomes:
- Checks work through Sentinel: a grant is honoured, no grant is a step-up.
- During a failover (SENTINEL FAILOVER, or the primary killed) no request without a valid grant
  is ever allowed; requests that cannot be answered fail closed with
  ``session-store-unavailable`` (403); the service recovers by itself within a bound.
- A demoted primary (READONLY) answering the Check's read-and-count fails closed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from authz.store.connections import SentinelWatcher
from tests.ha.cluster import SentinelSetup
from tests.ha.harness import SENSITIVE, STANDARD, Env, service_env
from tests.ha.load import Load

# ResourceWarnings from the injected faults are handled in conftest.py.
# Sentinel failovers run on the sentinels' own timers (down-after, failover timeout).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

RECOVERY_BOUND_S = 40.0
FAIL_CLOSED = {"session-store-unavailable", "audit-unavailable"}


def redis_settings(s: SentinelSetup, prefix: str) -> dict[str, object]:
    return {"sentinel": {"master_name": s.master_name, "nodes": s.nodes}, "key_prefix": prefix}


@pytest.fixture
async def env(sentinel_setup: SentinelSetup, tmp_path: Path) -> AsyncIterator[Env]:
    await asyncio.to_thread(sentinel_setup.wait_settled)  # after an earlier test's failover
    async with service_env(tmp_path, redis_settings(sentinel_setup, f"ha:{tmp_path.name}:")) as e:
        yield e


async def wait_replicated(s: SentinelSetup, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Until the replica has everything the primary has (so a failover loses nothing)."""
    deadline = time.monotonic() + timeout
    while True:
        primary = await asyncio.to_thread(s.primary().info, "replication")
        replica = await asyncio.to_thread(s.replica().info, "replication")
        if replica.get("slave_repl_offset", -1) >= primary["master_repl_offset"]:
            return
        assert time.monotonic() < deadline, (primary, replica)
        await asyncio.sleep(0.05)


async def test_checks_through_sentinel(env: Env, sentinel_setup: SentinelSetup) -> None:
    alice, bob = await env.token("alice"), await env.token("bob")
    await env.grant(alice)
    r = await env.check(SENSITIVE, alice)
    assert r.allowed, r
    r = await env.check(SENSITIVE, bob)
    assert (r.allowed, r.status) == (False, 401), r  # RFC 9470 step-up challenge
    assert r.reason != "session-store-unavailable"
    assert (await env.check(STANDARD, bob)).allowed


# redis-py drops a half-made connection when no sentinel names a primary yet (mid-election);
# it (and its asyncio StreamWriter) is closed by the garbage collector, whose ResourceWarning
# is not ours to fix here.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*AbstractConnection.__del__:"
    "pytest.PytestUnraisableExceptionWarning"
)
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*StreamWriter.__del__:pytest.PytestUnraisableExceptionWarning"
)
@pytest.mark.parametrize("how", ["sentinel-failover", "kill-primary"])
async def test_failover_under_load(env: Env, sentinel_setup: SentinelSetup, how: str) -> None:
    s = sentinel_setup
    alice, bob = await env.token("alice"), await env.token("bob")
    await env.grant(alice)
    await wait_replicated(s)
    load = Load(env, SENSITIVE, alice, bob)
    load.start()
    killed = None
    try:
        await asyncio.sleep(1.0)
        assert load.allowed_without_grant == 0, load.summary()
        assert any(x.allowed for x in load.samples if x.granted), load.summary()
        old = await asyncio.to_thread(s.primary_port)
        started = time.monotonic()
        if how == "sentinel-failover":
            await asyncio.to_thread(s.failover)
        else:
            killed = s.node(old)
            await asyncio.to_thread(killed.kill)
            await asyncio.to_thread(s.wait_new_primary, old, RECOVERY_BOUND_S)
        switched = time.monotonic() - started
        if killed is not None:  # back, empty; the sentinels make it a replica again
            await asyncio.to_thread(killed.start)
        # A demoted primary keeps answering as a primary until the sentinels convert it
        # (about 10 s): clients holding connections to it keep using it until then.
        await asyncio.to_thread(s.wait_settled, RECOVERY_BOUND_S)
        settled_at = time.monotonic()
        settled = settled_at - started
        # Pooled connections to the demoted node fail once (READONLY) and reconnect to the
        # new primary: recovery is counted from the settled topology.
        recovered = await load.wait_recovered(settled_at, RECOVERY_BOUND_S) + settled
    finally:
        await load.stop()
    print(
        f"\n[{how}] sentinels switched in {switched:.2f}s, topology settled in "
        f"{settled:.2f}s; service recovered {recovered:.2f}s after the trigger; "
        f"{load.summary()}"
    )
    assert load.allowed_without_grant == 0, load.summary()
    # Without a grant: a step-up challenge, or a fail-closed error; never anything else.
    assert set(load.reasons(False)) <= {"acr-insufficient", *FAIL_CLOSED}, load.summary()
    # With a grant: while Redis was unreachable, fail closed: the session read's reason, or
    # the audit-before-access write's (same Redis) when that was what failed first.
    assert set(load.reasons(True)) <= FAIL_CLOSED, load.summary()
    assert all(smp.status == 403 for smp in load.samples if smp.reason in FAIL_CLOSED)
    # Every fail-closed answer the clients saw was counted by the service.
    seen = sum(1 for smp in load.samples if smp.reason in FAIL_CLOSED)
    assert (
        sum(env.metric("stepup_authz_fail_closed_total", {"cause": c}) for c in FAIL_CLOSED) == seen
    )


async def test_a_switch_is_followed_at_once_not_when_the_old_primary_is_demoted(
    env: Env,
    sentinel_setup: SentinelSetup,
) -> None:
    """After SENTINEL FAILOVER the old primary answers as a primary for ~10 s more, so a
    service still connected to it would not see a grant (or a revocation) written on the
    new one. The service follows +switch-master: a grant written only on the new primary
    is honoured within a couple of seconds of the switch, long before the demotion."""
    s = sentinel_setup
    alice = await env.token("alice")
    assert not (await env.check(SENSITIVE, alice)).allowed  # no grant: step-up
    await wait_replicated(s)
    old = await asyncio.to_thread(s.primary_port)
    await asyncio.to_thread(s.failover)  # every sentinel names the new primary
    switched = time.monotonic()
    old_role = await asyncio.to_thread(s.node(old).call, "ROLE")
    await env.grant(alice)  # a fresh client: written on the new primary only
    while not (r := await env.check(SENSITIVE, alice)).allowed:
        assert time.monotonic() - switched < 5.0, (r, old_role)
        await asyncio.sleep(0.05)
    followed = time.monotonic() - switched
    watcher = next(c for c in env.service._closers if isinstance(c, SentinelWatcher))
    print(
        f"\n[sentinel failover] grant on the new primary honoured {followed:.2f}s after "
        f"the switch; old primary's role then: {old_role[0]!r}; switches seen: "
        f"{watcher.switches}"
    )
    assert watcher.switches >= 1


async def test_readonly_demoted_primary_fails_closed(
    sentinel_setup: SentinelSetup, tmp_path: Path
) -> None:
    """A static URL left pointing at a node that is now a replica (the demoted primary):
    the Check's read-and-count script hits READONLY and the Check fails closed, even for a
    session whose grant the replica holds; writing a grant there fails too."""
    s = sentinel_setup
    prefix = f"ro:{tmp_path.name}:"
    async with service_env(tmp_path / "p", redis_settings(s, prefix)) as primary_env:
        alice = await primary_env.token("alice")
        await primary_env.grant(alice)
        assert (await primary_env.check(SENSITIVE, alice)).allowed
        await wait_replicated(s)
        replica_url = f"redis://{s.replica().address}"
        async with service_env(tmp_path / "r", {"url": replica_url, "key_prefix": prefix}) as env:
            alice2 = await env.token("alice")
            before = env.metric(
                "stepup_authz_fail_closed_total", {"cause": "session-store-unavailable"}
            )
            r = await env.check(SENSITIVE, alice2)
            assert (r.allowed, r.status, r.reason) == (False, 403, "session-store-unavailable")
            assert (
                env.metric("stepup_authz_fail_closed_total", {"cause": "session-store-unavailable"})
                == before + 1
            )
            with pytest.raises(Exception, match=r"READONLY|ReadOnly"):
                await env.grant(alice2)
