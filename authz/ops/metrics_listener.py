"""``/metrics`` on a listener of its own (settings ``metrics.port``).

The HTTP port serves ``/_stepup/*`` to every user through the proxies; the metrics belong to
the monitoring stack only. A port of their own lets the NetworkPolicy admit each party to
exactly its port. The composition root starts this next to the HTTP port:

    runner = await start_metrics_listener(settings.metrics, metrics)   # None: not configured

and cleans the runner up on stop. The registry is read at each scrape, so the multiprocess
registry ``serve --workers`` swaps in after start-up is what it serves.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from authz.config.settings import MetricsSettings
from authz.ops.metrics import Metrics


def metrics_app(metrics: Metrics) -> web.Application:
    """GET /metrics (and nothing else: every other path is 404)."""

    async def scrape(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app


async def start_metrics_listener(
    settings: MetricsSettings, metrics: Metrics
) -> web.AppRunner | None:
    """Serve ``/metrics`` on ``settings.host:settings.port``; None when no port is set.

    ``reuse_port`` as the other listeners: ``serve --workers`` binds it in every worker.
    """
    if settings.port is None:
        return None
    runner = web.AppRunner(metrics_app(metrics), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=True)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
