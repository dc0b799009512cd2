"""The service's listeners as the composition root starts them: ``/metrics`` on a port of
its own when ``metrics.port`` is set (and then not on the step-up port)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.ha.harness import PUBLIC_PATH, service_env

pytestmark = pytest.mark.integration


async def test_the_service_starts_its_metrics_listener(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    redis = {"url": redis_url, "key_prefix": redis_prefix}
    async with service_env(tmp_path, redis, {"metrics": {"port": 0}}) as env:
        assert (await env.check(PUBLIC_PATH)).allowed
        port = env.service.metrics_port
        assert port is not None and port != env.service.http_port
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200
                text = await r.text()
            assert 'stepup_authz_checks_total{level="public",outcome="allow"' in text
            async with s.get(f"{env.http}/metrics") as r:
                assert r.status == 404  # the proxies reach this port: no metrics on it
            async with s.get(f"{env.http}/readyz") as r:
                assert r.status == 200
        service = env.service
    assert service.metrics_runner is not None
    with pytest.raises(aiohttp.ClientConnectorError):  # stopped with the service
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics"):
            pass


async def test_without_a_metrics_port_the_http_port_serves_them(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    redis = {"url": redis_url, "key_prefix": redis_prefix}
    async with service_env(tmp_path, redis) as env:
        assert env.service.metrics_port is None
        async with aiohttp.ClientSession() as s, s.get(f"{env.http}/metrics") as r:
            assert r.status == 200 and "\nstepup_authz_store_up 1.0\n" in await r.text()
