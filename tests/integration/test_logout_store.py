"""Back-channel logout against a real Redis: the logout token's jti is remembered with a
TTL (as long as the token could be accepted, not forever), a replay is refused, and the
session's grant written by the real store is gone."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from authz.config.settings import RedisSettings
from authz.core.session import Evidence, Grant, session_key, user_key
from authz.store.connections import make_client
from authz.store.sessions import RedisSessionStore
from tests.builders import ISSUER, NOW
from tests.unit.test_logout import KEY, Env, logout_claims, sign

pytestmark = pytest.mark.integration


async def test_the_jti_lives_in_redis_with_a_ttl_and_a_replay_ends_nothing(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    env = Env(tmp_path)
    store = RedisSessionStore(
        make_client(redis_url, RedisSettings()), prefix=redis_prefix, deadline_ms=2000
    )
    env.app.store = store
    uk, sk = user_key(ISSUER, "alice"), session_key(ISSUER, "alice", "s1")
    g = Grant("elevated", Evidence("mfa", ("pwd", "otp"), NOW), NOW + 900, NOW)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await store.write_grant(uk, sk, g, NOW)
        token = sign(KEY, logout_claims())
        async with TestClient(TestServer(env.app.build())) as client:
            first = await client.post("/_stepup/backchannel-logout", data={"logout_token": token})
            assert first.status == 200
            keys = [k async for k in raw.scan_iter(match=f"{redis_prefix}once:logout-jti:*")]
            assert len(keys) == 1
            ttl = await raw.ttl(keys[0])
            assert 140 <= ttl <= 150  # exp + leeway - now = 150 s, never without expiry
            assert (await store.list_sessions(uk)) == []  # the session and its grant ended
            await store.write_grant(uk, session_key(ISSUER, "alice", "s1"), g, NOW + 1)
            replay = await client.post("/_stepup/backchannel-logout", data={"logout_token": token})
            assert replay.status == 400
        assert env.logouts()[-1].reason == "logout-replayed"
        assert len(await store.list_sessions(uk)) == 1  # the new sign-in's grant stays
    finally:
        await raw.aclose()
        await store.aclose()
