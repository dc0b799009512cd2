"""A stalled event loop against real Redis: the Checks queued behind the stall whose Envoy
deadline passed are shed as ``overloaded`` without a Redis call, and the Checks whose
replies arrived during the stall are answered (not failed as ``session-store-unavailable``
because the loop, not Redis, was late).

The stall is a blocking call inside a socket's reader callback (what a long garbage collection or a
CPU-heavy neighbour does to every other task); Envoy's deadlines are read on the
authorizer's injected clock, which the stall moves past the queued Checks' deadlines.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from authz.check.authorizer import Authorizer, CheckResult
from authz.check.request import attributes_from_check
from authz.config.policy_file import PolicyHolder
from authz.config.settings import RedisSettings
from authz.core.decision import Outcome
from authz.core.reasons import Reason
from authz.core.session import Evidence, Grant, session_key, user_key
from authz.ops.metrics import Metrics
from authz.store.connections import make_client
from authz.store.fastredis import FastRedis
from authz.store.sessions import RedisSessionStore
from tests.builders import FakeClock, FakeTokens, check_request, identity

pytestmark = pytest.mark.integration

POLICY = """\
levels:
  standard: {}
  elevated: {acr: [mfa], max_age: 900}
routes:
  - {path_prefix: /accounts/, level: elevated}
default_level: standard
"""
STALL_S = 0.2  # four times the store's 50 ms deadline


async def test_stall_sheds_queued_expired_checks_and_fails_no_neighbour(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    await _scenario(redis_url, redis_prefix, tmp_path)


def test_the_same_on_uvloop(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    """The service's loop: uvloop runs due timers before it polls the sockets, so a reply
    that came during the stall is read only after the deadline timer fired (late)."""
    import uvloop

    uvloop.run(_scenario(redis_url, redis_prefix, tmp_path))


async def _scenario(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    now = int(time.time())
    who = identity(issuer="https://idp", acr="pwd", amr=("pwd",), expires_at=now + 600)
    tokens = FakeTokens()
    tokens.access["t"] = who
    fast = FastRedis.from_url(redis_url, connections=1)
    store = RedisSessionStore(
        make_client(redis_url, RedisSettings()),
        prefix=redis_prefix,
        deadline_ms=50,
        script_client=fast,
    )
    uk = user_key(who.issuer, who.subject)
    sk = session_key(who.issuer, who.subject, who.session_id)
    grant = Grant("elevated", Evidence("mfa", ("pwd", "otp"), now - 5), now + 600, now)
    await store.write_grant(uk, sk, grant, now)
    sent: list[str] = []
    execute_at = fast.execute_at

    async def counting(when: float, *args: Any) -> Any:
        sent.append(str(args[0]))
        return await execute_at(when, *args)

    store._execute_at = counting
    mono = FakeClock(1000.0)
    metrics = Metrics()
    authorizer = Authorizer(
        policy=PolicyHolder(tmp_path / "policy.yaml"),
        tokens=tokens,
        store=store,
        metrics=metrics,
        token_cookie="stepup_token",
        leeway=0,
        monotonic=mono,
    )
    attrs = attributes_from_check(check_request("/accounts/1", {"authorization": "Bearer t"}))
    wake, waker = socket.socketpair()
    try:
        assert (await authorizer.check(attrs, authorizer.deadline_in(0.2))).decision.outcome is (
            Outcome.ALLOW
        )
        await authorizer.drain()
        sent.clear()
        loop = asyncio.get_running_loop()
        queued: list[asyncio.Task[CheckResult]] = []

        def stall() -> None:
            # Run from a socket's reader callback, as a request's parsing would be: uvloop
            # runs it in its poll phase, so on the next pass the (late) deadline timers come
            # before the Redis socket is read.
            loop.remove_reader(wake)
            wake.recv(1)
            # Checks that arrive now queue behind the stall with 100 ms of Envoy's time.
            for _ in range(8):
                queued.append(
                    loop.create_task(authorizer.check(attrs, authorizer.deadline_in(0.1)))
                )
            time.sleep(STALL_S)  # the neighbour holding the loop
            mono.advance(STALL_S)

        # In flight: their reads are written (the flush runs before the stall), the replies
        # come while the loop is held.
        in_flight = [
            loop.create_task(authorizer.check(attrs, authorizer.deadline_in(1.0))) for _ in range(8)
        ]
        loop.add_reader(wake, stall)
        loop.call_soon(loop.call_soon, waker.send, b"x")
        done = await asyncio.wait_for(asyncio.gather(*in_flight), 10)
        shed = await asyncio.wait_for(asyncio.gather(*queued), 10)
        await authorizer.drain()
    finally:
        await store.aclose()
        await fast.aclose()
        for sock in (wake, waker):
            sock.close()
    assert len(queued) == 8
    assert [r.decision.outcome for r in done] == [Outcome.ALLOW] * 8, [
        r.decision.reason for r in done
    ]
    assert {r.decision.reason for r in shed} == {Reason.OVERLOADED}
    assert sent.count("EVALSHA") == 8  # the in-flight reads only: none for a shed check
    sample = metrics.registry.get_sample_value
    assert sample("stepup_authz_checks_shed_total") == 8
    assert sample("stepup_authz_fail_closed_total", {"cause": "session-store-unavailable"}) == 0
    assert sample("stepup_authz_fail_closed_total", {"cause": "overloaded"}) == 8
