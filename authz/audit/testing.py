"""Test helpers shipped next to the interfaces: a sample archive generator, an in-memory
mirror sink and an in-memory audit trail (unit tests, docs, trying ``audit verify``
without Redis)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

from authz.audit.archive import ArchiveWriter
from authz.audit.chain import SigningKey
from authz.audit.events import AuditEvent, EventType
from authz.audit.sinks import AuditUnavailable
from authz.core.reasons import Reason

_TYPES = (
    EventType.STEPUP_CHALLENGE,
    EventType.STEPUP_COMPLETED,
    EventType.ACCESS_ALLOWED,
    EventType.ACCESS_DENIED,
)


def sample_event(i: int, *, ts_ms: int = 1_700_000_000_000) -> AuditEvent:
    return AuditEvent(
        type=_TYPES[i % len(_TYPES)],
        ts_ms=ts_ms + i * 1000,
        decision_id=f"d{i}",
        user=f"https://idp.example|user{i % 3}",
        session=f"{i:040x}",
        device=f"dev{i}",
        client_ip="10.0.0.1",
        route=f"GET trading.example.com /accounts/{i}",
        level="elevated",
        outcome="allow",
        reason=Reason.ALLOWED,
        factor="otp",
        policy_version="v1",
        details=MappingProxyType({"acr": "mfa", "auth_time": 1}),
    )


def sample_archive(
    directory: Path,
    key: SigningKey,
    n: int = 30,
    *,
    max_bytes: int = 4096,
    checkpoint_every: int = 4,
    close: bool = True,
) -> ArchiveWriter:
    """An archive of ``n`` records across several segments (``max_bytes`` each)."""
    w = ArchiveWriter(
        directory,
        key,
        max_bytes=max_bytes,
        checkpoint_every=checkpoint_every,
        checkpoint_interval_s=3600,
    )
    w.open()
    for i in range(n):
        w.append([(f"{1_700_000_000_000 + i}-0", sample_event(i).to_record())])
    if close:
        w.close()
    return w


class MemorySink:
    """A mirror sink that keeps what it was given (the canonical record bytes)."""

    name = "memory"

    def __init__(self) -> None:
        self.records: list[bytes] = []

    def write_many(self, records: Sequence[bytes]) -> None:
        self.records.extend(records)


class MemoryAuditor:
    """``AuditTrail`` in a list: ``events`` holds every emitted or durably written event in
    order (``durable`` ones are also in ``durable_events``). Set ``fail`` to make the
    durable writes raise ``AuditUnavailable``, as a dead audit Redis would."""

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.events: list[AuditEvent] = []
        self.durable_events: list[AuditEvent] = []
        self.records: list[bytes] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)

    async def durable(self, event: AuditEvent) -> None:
        if self.fail:
            raise AuditUnavailable("MemoryAuditor.fail")
        self.events.append(event)
        self.durable_events.append(event)

    async def durable_record(self, record: bytes) -> None:
        if self.fail:
            raise AuditUnavailable("MemoryAuditor.fail")
        self.records.append(record)
