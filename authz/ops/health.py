"""``/healthz``, ``/readyz`` and ``/metrics`` on the HTTP port (``/metrics`` only while it has
no port of its own, ``authz/ops/metrics_listener.py``).

``/healthz``: the process answers. ``/readyz``: it should be sent traffic -- accepting
(false once shutdown began, so load balancers drain it first), verification keys loaded,
a policy in force. The session store's reachability is reported (``store: ok`` or
``store: down`` in the body, the ``stepup_authz_store_up`` gauge) but does not decide
readiness: with Redis down every replica is equally unable to read sessions, the Check
already fails closed on whatever needs the store, and public routes need none -- taking
every endpoint out of the Service would only take those down too. ``/metrics``: the
Prometheus registry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

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
        # The last answer of the store's ping (each /readyz asks): 1 up, 0 down.
        self.store_up = Gauge(
            "store_up",
            "1 when the session store answered the last readiness probe's ping.",
            namespace="stepup_authz",
            registry=metrics.registry,
            multiprocess_mode="min",
        )

    def add_routes(self, app: web.Application, *, metrics: bool = True) -> None:
        """``metrics=False`` when ``/metrics`` has a listener of its own (``metrics.port``):
        then the HTTP port, which the proxies reach, does not serve it."""
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        if metrics:
            app.router.add_get("/metrics", self.metrics_endpoint)

    async def probe_store(self) -> bool:
        """Ping the store and set the gauge (at start-up, then at each readiness probe)."""
        up = await self.store_ok()
        self.store_up.set(1 if up else 0)
        return up

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        checks = {
            "accepting": self.accepting,
            "keys": self.keys_ready(),
            "policy": self.policy_loaded(),
        }
        store = await self.probe_store()
        ok = all(checks.values())
        body = "".join(f"{k}: {'ok' if v else 'FAIL'}\n" for k, v in checks.items())
        # Reported, not required (see the module's docstring).
        body += f"store: {'ok' if store else 'down'}\n"
        return web.Response(status=200 if ok else 503, text=body)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )
