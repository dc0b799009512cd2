"""The audit trail's Prometheus collectors (prefix ``stepup_authz_``).

``AuditMetrics(registry)`` registers into the registry it is given: the service passes its
own (``Metrics.registry``) so ``/metrics`` shows them with the rest; the exporter process
makes its own and serves it on ``metrics_port``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

_NS = "stepup_authz"


class AuditMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "audit_events",
            "Audit records written, by sink and result (ok|error).",
            ["sink", "result"],
            namespace=_NS,
            registry=registry,
        )
        self.dropped = Counter(
            "audit_dropped",
            "Audit records that could not be written and were discarded "
            "(buffer full, or still unwritten at shutdown). Alert on any increase.",
            namespace=_NS,
            registry=registry,
        )
        self.lag = Gauge(
            "audit_lag_seconds",
            "Age of the oldest stream record not yet archived "
            "(0 when the archive is current). Set by the exporter.",
            namespace=_NS,
            registry=registry,
        )
        self.buffered = Gauge(
            "audit_buffer_events",
            "Non-critical audit records waiting in the bounded buffer.",
            namespace=_NS,
            registry=registry,
        )
        self.checkpoints = Counter(
            "audit_checkpoints",
            "Signed checkpoints written by the exporter.",
            namespace=_NS,
            registry=registry,
        )
        # Series exist at 0 before the first event, so alerts can use increase().
        for sink in ("redis", "stdout", "archive"):
            for result in ("ok", "error"):
                self.events.labels(sink=sink, result=result)
