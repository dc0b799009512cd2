"""Producers' MACs and sequence numbers (authz/audit/mac.py, producers.py) and the
Auditor's side of them: what an entry needs to be accepted, and every way it is not."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from authz.audit.events import EventType, encode_event
from authz.audit.mac import MacKeyRing, Producer, verify_entry
from authz.audit.mapping import producer_started, producer_stopped
from authz.audit.metrics import AuditMetrics
from authz.audit.producers import ProducerTracker, Verdict
from authz.audit.sinks import Auditor, AuditUnavailable
from authz.audit.testing import StreamWriter, make_ring, sample_event
from authz.errors import ConfigError

RING = make_ring("k1")
STREAM = "stepup:audit"


def entry(w: StreamWriter, event: Any = None) -> dict[bytes, bytes]:
    return w.fields(event if event is not None else sample_event(1))


# -- the MAC -----------------------------------------------------------------------------------


def test_a_stamped_entry_verifies_and_numbers_run_on() -> None:
    w = StreamWriter(RING, STREAM, "pod-1:7:abcd")
    a, b = entry(w), entry(w)
    ea, eb = verify_entry(RING, STREAM, a), verify_entry(RING, STREAM, b)
    assert (ea.producer, ea.seq, eb.seq, ea.kid) == ("pod-1:7:abcd", 1, 2, "k1")
    assert ea.record == a[b"r"]


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda f: f.pop(b"m"), "mac-missing"),
        (lambda f: f.update({b"r": f[b"r"].replace(b"user", b"usr")}), "mac-invalid"),
        (lambda f: f.update({b"n": b"99"}), "mac-invalid"),  # another number: replay trick
        (lambda f: f.update({b"p": b"someone-else"}), "mac-invalid"),
        (lambda f: f.update({b"k": b"other"}), "unknown-key"),
        (lambda f: f.update({b"n": b"01"}), "malformed-entry"),
        (lambda f: f.update({b"p": b"bad id!"}), "malformed-entry"),
        (lambda f: f.update({b"x": b"extra"}), "malformed-entry"),
        (lambda f: f.pop(b"r"), "malformed-entry"),
    ],
)
def test_a_tampered_entry_is_refused_with_its_reason(tamper: Any, reason: str) -> None:
    from authz.audit.mac import EntryRefused

    fields = entry(StreamWriter(RING, STREAM))
    tamper(fields)
    with pytest.raises(EntryRefused) as err:
        verify_entry(RING, STREAM, fields)
    assert err.value.reason == reason


def test_an_entry_copied_to_another_stream_or_verified_with_another_key_fails() -> None:
    from authz.audit.mac import EntryRefused

    fields = entry(StreamWriter(RING, STREAM))
    with pytest.raises(EntryRefused, match="MAC"):
        verify_entry(RING, "other:stream", fields)
    with pytest.raises(EntryRefused):
        verify_entry(make_ring("k1"), STREAM, fields)  # same kid, another secret


def test_rotation_old_and_new_keys_verify_side_by_side() -> None:
    old, new = MacKeyRing({"k1": b"1" * 32}, "k1"), MacKeyRing({"k2": b"2" * 32}, "k2")
    both = MacKeyRing({"k1": b"1" * 32, "k2": b"2" * 32}, "k2")
    a = entry(StreamWriter(old, STREAM))
    b = entry(StreamWriter(new, STREAM))
    assert verify_entry(both, STREAM, a).kid == "k1"
    assert verify_entry(both, STREAM, b).kid == "k2"


def test_key_files_and_the_ring_refuse_bad_keys(tmp_path: Any) -> None:
    short = tmp_path / "short.key"
    short.write_text("c2hvcnQ=\n")
    with pytest.raises(ConfigError, match="32 random bytes"):
        MacKeyRing.from_files({"k1": short}, "k1")
    with pytest.raises(ConfigError, match="no MAC key"):
        MacKeyRing.from_files({}, None)
    with pytest.raises(ConfigError, match="No such file"):
        MacKeyRing.from_files({"k1": tmp_path / "missing"}, "k1")
    with pytest.raises(ConfigError, match="key ids"):
        MacKeyRing({"bad kid": b"x" * 32}, "bad kid")


# -- the sequence account ------------------------------------------------------------------


def started(seq: int = 1) -> dict[str, Any]:
    return producer_started(first_seq=seq, mac_kid="k1", host="h", pid=1).to_record()


def rec(etype: str = "access.allowed") -> dict[str, Any]:
    return {"type": etype, "event_id": "e"}


def test_an_announced_producer_in_order_out_of_order_and_its_clean_stop() -> None:
    t = ProducerTracker(reorder_window_ms=1000)
    assert t.observe("p", 1, started(), 0) == (Verdict.ACCEPT, "")
    assert t.observe("p", 3, rec(), 10)[0] is Verdict.ACCEPT  # ahead of 2: a hole
    assert t.due(500) == []  # within the reorder window: not a gap yet
    assert t.observe("p", 2, rec(), 600)[0] is Verdict.ACCEPT  # arrived late: fine
    assert t.states["p"].next == 4 and t.states["p"].ahead == {}
    stop = producer_stopped(dropped=0).to_record()
    assert t.observe("p", 4, stop, 700)[0] is Verdict.ACCEPT
    assert t.due(10_000) == [] and "p" not in t.states  # every number up to the stop
    # A producer that stopped cleanly is forgotten: more records claiming it are unknown.
    assert t.observe("p", 5, rec(), 800) == (Verdict.QUARANTINE, "unknown-producer")


def test_a_hole_older_than_the_window_is_a_gap_record_and_a_late_arrival_is_named() -> None:
    t = ProducerTracker(reorder_window_ms=1000)
    t.observe("p", 1, started(), 0)
    t.observe("p", 2, rec(), 0)
    t.observe("p", 5, rec(), 100)  # 3 and 4 missing
    t.observe("p", 6, rec(), 200)
    t.observe("p", 9, rec(), 300)  # 7 and 8 missing
    (gap,) = t.due(1150)  # the first hole is 1050 ms old; the second 850 ms
    r = gap.to_record()
    assert (r["type"], r["of_producer"], r["first_missing"], r["last_missing"]) == (
        "audit.gap",
        "p",
        3,
        4,
    )
    assert r["missing"] == 2 and r["outcome"] == "missing"
    (gap2,) = t.due(1400)
    assert (gap2.details["first_missing"], gap2.details["last_missing"]) == (7, 8)
    assert t.states["p"].next == 10
    assert t.observe("p", 4, rec(), 1500) == (Verdict.QUARANTINE, "arrived-after-gap")


def test_unknown_producers_replays_duplicates_and_bad_announcements() -> None:
    t = ProducerTracker()
    assert t.observe("x", 5, rec(), 0) == (Verdict.QUARANTINE, "unknown-producer")
    assert t.observe("x", 5, started(4), 0) == (Verdict.QUARANTINE, "bad-announcement")
    t.observe("p", 1, started(), 0)
    t.observe("p", 2, rec(), 0)
    assert t.observe("p", 2, rec(), 1, recent=True) == (Verdict.DUPLICATE, "")  # a retry
    assert t.observe("p", 2, rec(), 1) == (Verdict.QUARANTINE, "sequence-replayed")
    assert t.observe("p", 3, started(3), 1) == (Verdict.QUARANTINE, "bad-announcement")
    t.observe("p", 3, producer_stopped(dropped=0).to_record(), 2)
    assert t.observe("p", 4, rec(), 3) == (Verdict.QUARANTINE, "after-stop")


def test_a_silent_producer_is_reported_once_and_forgotten_later() -> None:
    t = ProducerTracker(silent_after_ms=1000, forget_after_ms=5000)
    t.observe("p", 1, started(), 0)
    t.observe("p", 2, rec(), 100)
    assert t.due(900) == []
    (silent,) = t.due(1100)
    assert silent.type is EventType.PRODUCER_SILENT
    assert (silent.details["of_producer"], silent.details["last_seq"]) == ("p", 2)
    assert t.due(2000) == []  # once
    t.observe("p", 3, rec(), 2100)  # it was only quiet: heard from again, accepted
    assert not t.states["p"].silent
    t.due(3200)
    t.due(8300)
    assert "p" not in t.states


def test_the_account_survives_a_snapshot_and_a_replay() -> None:
    t = ProducerTracker(reorder_window_ms=1000)
    t.observe("p", 1, started(), 0)
    t.observe("p", 2, rec(), 0)
    t.observe("p", 4, rec(), 10)
    snap = json.loads(json.dumps(t.snapshot()))  # as a checkpoint carries it
    u = ProducerTracker.restore(
        snap, reorder_window_ms=1000, silent_after_ms=300_000, forget_after_ms=10**9
    )
    assert u.snapshot() == t.snapshot()
    # Replayed: what was archived after the snapshot (a record, then the gap record).
    u.replay({"producer": "p", "producer_seq": 5, "type": "access.allowed"}, 20)
    gap_line = {"type": "audit.gap", "of_producer": "p", "first_missing": 3, "last_missing": 3}
    u.replay(gap_line, 2000)
    assert u.states["p"].next == 6 and u.states["p"].gaps == [(3, 3)]


# -- the Auditor as a producer ---------------------------------------------------------------


class FakeSink:
    """A RedisStreamSink stand-in that records entries and can be told to fail."""

    def __init__(self) -> None:
        self.entries: list[tuple[bytes, ...]] = []
        self.down = False

    async def write(self, fields: tuple[bytes, ...]) -> None:
        if self.down:
            raise AuditUnavailable("down")
        self.entries.append(fields)

    async def write_many(self, entries: Sequence[tuple[bytes, ...]], timeout_s: float) -> None:
        for f in entries:
            await self.write(f)


def types(sink: FakeSink) -> list[tuple[int, str]]:
    out = []
    for f in sink.entries:
        e = verify_entry(RING, STREAM, dict(zip(f[::2], f[1::2], strict=True)))
        out.append((e.seq, json.loads(e.record)["type"]))
    return out


async def test_the_auditor_announces_first_resends_a_refused_record_and_stops_last() -> None:
    sink = FakeSink()
    m = AuditMetrics(CollectorRegistry())
    a = Auditor(sink, producer=Producer(RING, STREAM), metrics=m)  # type: ignore[arg-type]
    a.start()
    await a.durable(sample_event(0))
    sink.down = True
    with pytest.raises(AuditUnavailable):
        await a.durable_record(encode_event(sample_event(1)))
    a.emit(sample_event(2))
    sink.down = False
    assert await a.flush(5)
    await a.aclose()
    assert types(sink) == [
        (1, "audit.producer_started"),
        (2, "stepup.challenge"),
        (3, "stepup.completed"),  # refused once, sent again: its number is not a gap
        (4, "access.allowed"),
        (5, "audit.producer_stopped"),
    ]


async def test_an_idle_auditor_heartbeats_and_a_busy_one_does_not() -> None:
    sink = FakeSink()
    a = Auditor(
        sink,  # type: ignore[arg-type]
        producer=Producer(RING, STREAM),
        metrics=AuditMetrics(CollectorRegistry()),
    )
    await a.durable(sample_event(0))
    assert not a.heartbeat_tick()  # a record in this interval: not idle
    assert a.heartbeat_tick()  # nothing in the next one: a heartbeat is queued
    a.start()
    assert await a.flush(5)
    assert a.heartbeat_tick()  # still quiet: another interval, another heartbeat
    assert await a.flush(5)
    await durable_burst(a)
    assert not a.heartbeat_tick()  # busy: none
    await a.aclose()
    kinds = [t for _, t in types(sink)]
    assert kinds.count("audit.producer_heartbeat") == 2
    beat = next(
        json.loads(dict(zip(f[::2], f[1::2], strict=True))[b"r"])
        for f in sink.entries
        if b"heartbeat" in f[1]
    )
    assert beat["last_seq"] == 2  # the announcement and one record before it


async def durable_burst(a: Auditor) -> None:
    await asyncio.gather(*(a.durable(sample_event(i)) for i in range(3)))
