"""The browser step-up endpoints wait on Redis with their own deadline
(``stepup.store_deadline_ms``, 1 s by default), not the Check's few milliseconds: with
every Redis answer held back 200 ms (a loaded server, through a real TCP proxy in front of
a real Valkey) the Check fails closed by its own deadline while a sign-in still starts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from authz.store.connections import EmbeddedValkey
from tests.ha.harness import STANDARD, Env, service_env

pytestmark = pytest.mark.integration

HELD_BACK_S = 0.2  # above the Check's 50 ms, below the step-up's 1 s


@dataclass
class SlowProxy:
    """TCP to ``upstream``; while ``delay_s`` is set, each answer waits that long."""

    upstream_port: int
    delay_s: float = 0.0
    port: int = 0

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, slow: bool) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while chunk := await src.read(65536):
                if slow and self.delay_s:
                    await asyncio.sleep(self.delay_s)  # the fault injected, not a test wait
                dst.write(chunk)
                await dst.drain()
        dst.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(
            self._pipe(reader, up_writer, slow=False), self._pipe(up_reader, writer, slow=True)
        )


@contextlib.asynccontextmanager
async def slow_proxy(upstream_port: int) -> AsyncIterator[SlowProxy]:
    proxy = SlowProxy(upstream_port)
    server = await asyncio.start_server(proxy._serve, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()


@pytest.fixture
async def slow(
    embedded_valkey: EmbeddedValkey, tmp_path: Path
) -> AsyncIterator[tuple[Env, SlowProxy]]:
    async with (
        slow_proxy(embedded_valkey.port) as proxy,
        service_env(
            tmp_path, {"url": f"redis://127.0.0.1:{proxy.port}"}, {"audit": {"enabled": False}}
        ) as env,
    ):
        yield env, proxy


async def login(env: Env) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{env.http}/_stepup/login?rd=/news", allow_redirects=False) as resp,
    ):
        return resp.status, resp.headers.get("Location", ""), await resp.text()


async def test_a_slow_redis_fails_the_check_but_not_the_stepup_pages(
    slow: tuple[Env, SlowProxy],
) -> None:
    env, proxy = slow
    token = await env.token("alice")
    assert (await env.check(STANDARD, token)).allowed
    assert (await login(env))[0] == 302  # both clients have a connection open
    proxy.delay_s = HELD_BACK_S
    r = await env.check(STANDARD, token)
    assert (r.allowed, r.reason) == (False, "session-store-unavailable"), r
    status, location, body = await login(env)
    assert status == 302, body
    assert urlsplit(location).path.endswith("/authorize")  # the state was stored: on to the IdP
