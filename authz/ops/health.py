"""``/healthz``, ``/readyz`` and ``/metrics`` on the HTTP port.

``/healthz``: the process answers. ``/readyz``: it should be sent traffic -- accepting
(false once shutdown began, so load balancers drain it first), verification keys loaded,
a policy in force; the session store's reachability is reported too. ``/metrics``: the
Prometheus registry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from authz.ops.metrics import Metrics


class Health:
    def __init__(
        self,
        *,
        metrics: Metrics,
        store_ok: Callable[[], Awaitable[bool]],
        keys_ready: Callable[[], bool],
        policy_loaded: Callable[[], bool],
    ) -> None:
        self.metrics = metrics
        self.store_ok = store_ok
        self.keys_ready = keys_ready
        self.policy_loaded = policy_loaded
        self.accepting = True

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_endpoint)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        checks = {
            "accepting": self.accepting,
            "store": await self.store_ok(),
            "keys": self.keys_ready(),
            "policy": self.policy_loaded(),
        }
        ok = all(checks.values())
        body = "".join(f"{k}: {'ok' if v else 'FAIL'}\n" for k, v in checks.items())
        return web.Response(status=200 if ok else 503, text=body)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )
