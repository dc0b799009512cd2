"""The verifiable audit trail: events, sinks and the Auditor (service side); the exporter,
archive, verify and export (records side).

Service side: ``Auditor.durable`` (audit before access) and ``Auditor.emit`` (bounded,
non-blocking); records go to a Redis Stream. The exporter process moves them, in order and
exactly once, into hash-chained, Ed25519-checkpointed JSON Lines segments.
"""

from authz.audit.events import AuditEvent, EventType, canonical_bytes, encode_event
from authz.audit.metrics import AuditMetrics
from authz.audit.sinks import (
    AUDIT_UNAVAILABLE,
    Auditor,
    AuditUnavailable,
    RedisStreamSink,
    StdoutSink,
)

__all__ = [
    "AUDIT_UNAVAILABLE",
    "AuditEvent",
    "AuditMetrics",
    "AuditUnavailable",
    "Auditor",
    "EventType",
    "RedisStreamSink",
    "StdoutSink",
    "canonical_bytes",
    "encode_event",
]
