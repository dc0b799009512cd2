"""/metrics on its own port (settings metrics.port): the listener serves the registry it is
given, at each scrape, and nothing else."""

from __future__ import annotations

import aiohttp
import pytest

from authz.config.settings import MetricsSettings
from authz.ops.metrics import Metrics
from authz.ops.metrics_listener import start_metrics_listener

pytestmark = pytest.mark.integration


async def test_serves_the_registry_and_nothing_else() -> None:
    metrics = Metrics()
    assert await start_metrics_listener(MetricsSettings(), metrics) is None  # not configured
    runner = await start_metrics_listener(MetricsSettings(port=0), metrics)
    assert runner is not None
    try:
        port = runner.addresses[0][1]
        metrics.checks.labels(outcome="allow", reason="allowed", level="standard").inc()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
                assert r.status == 200 and r.content_type == "text/plain"
            assert (
                'stepup_authz_checks_total{level="standard",outcome="allow",reason="allowed"} 1.0'
                in text
            )
            for path in ("/_stepup/start", "/healthz", "/"):
                async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                    assert r.status == 404
    finally:
        await runner.cleanup()
