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
        self.quarantined = Counter(
            "audit_quarantined",
            "Stream entries the exporter could not verify (bad or missing MAC, unknown "
            "producer or key, replayed sequence number): archived as audit.quarantined, "
            "never as the record they claim to be. Alert on any increase.",
            ["reason"],
            namespace=_NS,
            registry=registry,
        )
        self.missing = Counter(
            "audit_missing_records",
            "Records missing from a producer's sequence (deleted from the stream, or lost "
            "by the producer): each gap is an audit.gap record. Alert on any increase.",
            namespace=_NS,
            registry=registry,
        )
        self.silent = Counter(
            "audit_producers_silent",
            "Producers that went silent without a stop record (audit.producer_silent).",
            namespace=_NS,
            registry=registry,
        )
        self.duplicates = Counter(
            "audit_duplicates",
            "Stream entries dropped as copies of a record archived moments ago (retries).",
            namespace=_NS,
            registry=registry,
        )
        # Series exist at 0 before the first event, so alerts can use increase().
        for sink in ("redis", "stdout", "archive"):
            for result in ("ok", "error"):
                self.events.labels(sink=sink, result=result)
        for reason in QUARANTINE_REASONS:
            self.quarantined.labels(reason=reason)


# Every reason the exporter quarantines an entry for (authz/audit/mac.py verify_entry,
# authz/audit/producers.py observe, and an authenticated entry whose record is not valid).
QUARANTINE_REASONS = (
    "mac-missing",
    "mac-invalid",
    "unknown-key",
    "malformed-entry",
    "malformed-record",
    "unknown-producer",
    "bad-announcement",
    "sequence-replayed",
    "arrived-after-gap",
    "after-stop",
)
