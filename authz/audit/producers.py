"""The exporter's account of each producer's sequence numbers (pure: time is passed in).

A producer announces itself (``audit.producer_started``, its first sequence number) and
numbers every record 1, 2, 3, ...; its records may reach the stream slightly out of order
(several connections; a retried batch). ``observe`` judges one verified entry:

- from a producer never announced: **quarantined** (``unknown-producer``);
- a sequence number seen before: a **duplicate** (a retried XADD whose reply was lost: the
  same event id archived moments ago) or else **quarantined** (``sequence-replayed``:
  a copy of an old genuine entry; ``arrived-after-gap`` when its gap was reported already);
- after the producer's stop record: **quarantined** (``after-stop``);
- otherwise **accepted**; a number above the next expected one opens a hole.

``due(now)`` turns holes older than the reorder window into ``audit.gap`` records and
producers silent too long (no record, no heartbeat, no stop) into ``audit.producer_silent``.
The state is a pure function of what was archived, so after a crash it is the snapshot in
the last checkpoint plus the archived records after it (``replay``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from authz.audit.events import AuditEvent, EventType
from authz.audit.mapping import producer_silent, sequence_gap

_MAX_GAPS_KEPT = 16  # reported gap ranges remembered per producer (to name a late arrival)


class Verdict(Enum):
    ACCEPT = "accept"
    DUPLICATE = "duplicate"
    QUARANTINE = "quarantine"


@dataclass
class ProducerState:
    next: int  # the lowest sequence number not seen yet
    last_ms: int  # when its newest record was seen
    ahead: dict[int, int] = field(default_factory=dict)  # seen seq > next -> when seen
    stopped_at: int | None = None  # the sequence number of its stop record
    silent: bool = False  # reported silent (and not heard from since)
    gaps: list[tuple[int, int]] = field(default_factory=list)  # reported missing ranges

    def seen(self, seq: int) -> bool:
        return seq < self.next or seq in self.ahead

    def as_dict(self) -> dict[str, Any]:
        return {
            "next": self.next,
            "last_ms": self.last_ms,
            "ahead": {str(k): v for k, v in sorted(self.ahead.items())},
            "stopped_at": self.stopped_at,
            "silent": self.silent,
            "gaps": [list(g) for g in self.gaps],
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ProducerState:
        return cls(
            next=int(doc["next"]),
            last_ms=int(doc["last_ms"]),
            ahead={int(k): int(v) for k, v in dict(doc.get("ahead") or {}).items()},
            stopped_at=None if doc.get("stopped_at") is None else int(doc["stopped_at"]),
            silent=bool(doc.get("silent", False)),
            gaps=[(int(a), int(b)) for a, b in doc.get("gaps") or ()],
        )


class ProducerTracker:
    def __init__(
        self,
        *,
        reorder_window_ms: int = 10_000,
        silent_after_ms: int = 300_000,
        forget_after_ms: int = 7 * 86_400_000,
        states: Mapping[str, ProducerState] | None = None,
    ) -> None:
        self.reorder_window_ms = reorder_window_ms
        self.silent_after_ms = silent_after_ms
        self.forget_after_ms = forget_after_ms
        self.states: dict[str, ProducerState] = dict(states or {})

    # -- judging entries ---------------------------------------------------------------
    def observe(
        self,
        producer: str,
        seq: int,
        record: Mapping[str, Any] | None,
        now_ms: int,
        *,
        recent: bool = False,
    ) -> tuple[Verdict, str]:
        """The verdict on one verified entry and, for a quarantine, its reason slug.
        ``record`` is the parsed record (None when it does not parse); ``recent`` whether
        its event id was archived moments ago (a benign retry)."""
        etype = record.get("type") if record is not None else None
        st = self.states.get(producer)
        if st is None:
            if etype == EventType.PRODUCER_STARTED and record is not None:
                if record.get("first_seq") != seq:
                    return Verdict.QUARANTINE, "bad-announcement"
                self.states[producer] = ProducerState(next=seq + 1, last_ms=now_ms)
                return Verdict.ACCEPT, ""
            return Verdict.QUARANTINE, "unknown-producer"
        if st.seen(seq):
            if recent:
                return Verdict.DUPLICATE, ""
            if any(a <= seq <= b for a, b in st.gaps):
                return Verdict.QUARANTINE, "arrived-after-gap"
            return Verdict.QUARANTINE, "sequence-replayed"
        if st.stopped_at is not None and seq > st.stopped_at:
            return Verdict.QUARANTINE, "after-stop"
        if etype == EventType.PRODUCER_STARTED:
            return Verdict.QUARANTINE, "bad-announcement"  # a second start of one producer
        if seq == st.next:
            st.next += 1
            while st.next in st.ahead:
                del st.ahead[st.next]
                st.next += 1
        else:
            st.ahead[seq] = now_ms
        st.last_ms = max(st.last_ms, now_ms)
        st.silent = False
        if etype == EventType.PRODUCER_STOPPED:
            st.stopped_at = seq
        return Verdict.ACCEPT, ""

    def due(self, now_ms: int) -> list[AuditEvent]:
        """The exporter's own records now due (gaps, silent producers), state updated."""
        out: list[AuditEvent] = []
        for pid in sorted(self.states):
            st = self.states[pid]
            while st.ahead:
                first_ahead = min(st.ahead)
                if now_ms - st.ahead[first_ahead] < self.reorder_window_ms:
                    break
                out.append(
                    sequence_gap(
                        of=pid, first_missing=st.next, last_missing=first_ahead - 1, ts_ms=now_ms
                    )
                )
                self._skip(st, st.next, first_ahead - 1)
            if st.stopped_at is not None and not st.ahead and st.next > st.stopped_at:
                del self.states[pid]  # ended cleanly: every record up to the stop is in
                continue
            idle = now_ms - st.last_ms
            if not st.silent and st.stopped_at is None and idle >= self.silent_after_ms:
                last = max(st.ahead, default=st.next - 1)
                out.append(producer_silent(of=pid, last_seq=last, last_seen_ms=st.last_ms))
                st.silent = True
            elif st.silent and idle >= self.forget_after_ms:
                del self.states[pid]
        return out

    @staticmethod
    def _skip(st: ProducerState, first: int, last: int) -> None:
        st.gaps = [*st.gaps, (first, last)][-_MAX_GAPS_KEPT:]
        st.next = last + 1
        while st.next in st.ahead:
            del st.ahead[st.next]
            st.next += 1

    # -- rebuilding after a restart --------------------------------------------------
    def replay(self, line: Mapping[str, Any], ms: int) -> None:
        """Apply one archived event line (written after the snapshot being restored)."""
        pid, seq = line.get("producer"), line.get("producer_seq")
        if isinstance(pid, str) and isinstance(seq, int):
            self.observe(pid, seq, line, ms)
            return
        etype = line.get("type")
        of = line.get("of_producer")
        st = self.states.get(of) if isinstance(of, str) else None
        if st is None:
            return
        if etype == EventType.SEQUENCE_GAP:
            first, last = line.get("first_missing"), line.get("last_missing")
            if isinstance(first, int) and isinstance(last, int) and first == st.next:
                self._skip(st, first, last)
        elif etype == EventType.PRODUCER_SILENT:
            st.silent = True

    def snapshot(self) -> dict[str, Any]:
        return {pid: st.as_dict() for pid, st in sorted(self.states.items())}

    @classmethod
    def restore(
        cls,
        snapshot: Mapping[str, Any] | None,
        *,
        reorder_window_ms: int,
        silent_after_ms: int,
        forget_after_ms: int,
    ) -> ProducerTracker:
        states = {str(pid): ProducerState.from_dict(doc) for pid, doc in (snapshot or {}).items()}
        return cls(
            states=states,
            reorder_window_ms=reorder_window_ms,
            silent_after_ms=silent_after_ms,
            forget_after_ms=forget_after_ms,
        )
