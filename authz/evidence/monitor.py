"""``CoverageMonitor``: the coverage check, periodically, inside the service.

Every ``coverage.interval_s`` it reads each configured Envoy's ``/config_dump`` (in a
thread: the fetch is blocking urllib, and the event loop answers Checks) and sets, per
Envoy admin address, ``stepup_authz_routes_uncovered``, ``stepup_authz_routes_fail_open``
and ``stepup_authz_coverage_unreachable``. An Envoy that cannot be read keeps its last
route counts and is marked unreachable: no reading is not a proof of coverage, and the
alert on unreachability says so. A failing run is logged; it never stops the service.

Wiring (``authz/app.py``)::

    monitor = CoverageMonitor.from_settings(settings, metrics)
    if monitor is not None:
        monitor.start()
        closers.append(monitor)   # aclose() on shutdown
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from authz.config.settings import CoverageSettings, Settings
from authz.evidence.coverage import CoverageReport, check_mesh, fetch_config_dump
from authz.ops.metrics import Metrics

log = logging.getLogger("authz.evidence.monitor")


def service_deadline_ms(settings: Settings) -> int:
    """The longest a Check waits on the service's own deadlines: the session read, then
    (for an audited allow) the durable audit write. Envoy's ext_authz timeout must be above
    it, or a slow store ends in Envoy's bare error instead of the service's own answer."""
    audit = settings.audit
    durable = audit.durable_deadline_ms if audit.enabled and audit.durable_level else 0
    return settings.redis.deadline_ms + durable


def exempt_prefixes(settings: Settings) -> tuple[str, ...]:
    configured = settings.coverage.exempt_prefixes
    if configured is not None:
        return configured
    return (settings.stepup.path_prefix.rstrip("/") + "/",)


class CoverageMonitor:
    def __init__(
        self,
        settings: CoverageSettings,
        metrics: Metrics,
        *,
        deadline_ms: int,
        exempt: Sequence[str] = ("/_stepup/",),
        fetch: Callable[[str, float], Mapping[str, Any]] = fetch_config_dump,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.deadline_ms = deadline_ms
        self.exempt = tuple(exempt)
        self._fetch = fetch
        self._clock = clock
        self.latest: CoverageReport | None = None
        self.runs = 0
        self.ran = asyncio.Event()  # set after every run (tests wait on it, not on time)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> CoverageMonitor | None:
        """A monitor for ``settings.coverage``, or None when no admin URL is configured."""
        if not settings.coverage.envoy_admin_urls:
            return None
        return cls(
            settings.coverage,
            metrics,
            deadline_ms=service_deadline_ms(settings),
            exempt=exempt_prefixes(settings),
        )

    async def run_once(self) -> CoverageReport:
        report = await asyncio.to_thread(
            check_mesh,
            self.settings.envoy_admin_urls,
            deadline_ms=self.deadline_ms,
            exempt_prefixes=self.exempt,
            timeout_s=self.settings.timeout_s,
            fetch=self._fetch,
            clock=self._clock,
        )
        unread = {e["envoy"] for e in report.errors}
        for url in self.settings.envoy_admin_urls:
            self.metrics.coverage_unreachable.labels(envoy=url).set(1 if url in unread else 0)
            if url in unread:
                continue
            self.metrics.routes_uncovered.labels(envoy=url).set(report.count("uncovered", url))
            self.metrics.routes_fail_open.labels(envoy=url).set(report.count("fail-open", url))
        if report.uncovered or report.fail_open:
            log.error(
                "mesh coverage: routes bypass or fail open",
                extra={"uncovered": report.uncovered, "fail_open": report.fail_open},
            )
        self.latest = report
        self.runs += 1
        self.ran.set()
        return report

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # a bug here must not take the service down; it is logged
                log.exception("mesh coverage check failed")
            await asyncio.sleep(self.settings.interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    stop = aclose
