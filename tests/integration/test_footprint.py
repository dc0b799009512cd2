"""The Redis footprint of one active user, measured with MEMORY USAGE (the README's figure).

Run with ``-s`` to see the figures: ``pytest -q tests/integration/test_footprint.py -s``.
"""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from authz.config.settings import RedisSettings
from authz.core.session import Evidence, Grant, session_key, user_key
from authz.store.connections import EmbeddedValkey, make_client
from authz.store.sessions import RedisSessionStore

pytestmark = pytest.mark.integration

LEVELS = ["elevated", "high"]


@pytest.mark.parametrize("backend", ["redis", "embedded"])
async def test_bytes_per_active_user(backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
    else:
        server: EmbeddedValkey = request.getfixturevalue("embedded_valkey")
        url, prefix = server.url, "fp:"
    store = RedisSessionStore(make_client(url, RedisSettings()), prefix=prefix, deadline_ms=2000)
    raw = aioredis.Redis.from_url(url)
    try:
        now = int(time.time())
        uk = user_key("https://idp.example.com", "alice@example.com")
        sk = session_key("https://idp.example.com", "alice@example.com", "sid-4f1c2a9e")
        # a day's start: sign-in, two step-ups on two devices, 50 sensitive checks
        for level, device, ip in (
            ("elevated", "cookie:" + "a" * 32, "198.51.100.10"),
            ("high", "spiffe://corp.example/device/42", "10.1.2.3"),
        ):
            g = Grant(
                level, Evidence("mfa", ("pwd", "otp"), now), now + 900, now, device=device, ip=ip
            )
            await store.write_grant(uk, sk, g, now)
        for i in range(50):
            await store.read_check(
                user=uk,
                session=sk,
                levels=LEVELS,
                level="elevated",
                device="cookie:" + "a" * 32,
                ip="198.51.100.10",
                sensitive=True,
                window_s=60,
                now=now + i,
            )
            await store.note_allow(
                user=uk,
                session=sk,
                level="elevated",
                ip="198.51.100.10",
                device="cookie:" + "a" * 32,
                now=now + i,
                lat=40.71,
                lon=-74.01,
            )
        keys = [k async for k in raw.scan_iter(match=f"{prefix}u:*")]
        sizes = {k.decode(): int(await raw.memory_usage(k) or 0) for k in keys}
        total = sum(sizes.values())
        print(f"\n{backend}: {len(keys)} keys, {total} bytes per active user")
        for k, v in sorted(sizes.items()):
            print(f"  {v:5d}  {k[len(prefix) :]}")
        assert 6 <= len(keys) <= 12
        assert total < 4096  # the README states ~2 KB; this bound catches a regression
    finally:
        await raw.aclose()
        await store.aclose()
