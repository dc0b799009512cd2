"""The stdout mirror never blocks the event loop: a stalled log reader fills a bounded
queue, the overflow is refused (and counted by the Auditor), the rest is written in order
once the reader drains."""

from __future__ import annotations

import io
import threading

import pytest
from prometheus_client import CollectorRegistry

from authz.audit.mac import Producer
from authz.audit.metrics import AuditMetrics
from authz.audit.sinks import Auditor, StdoutSink
from authz.audit.testing import make_ring

PRODUCER = Producer(make_ring(), "stepup:audit")


class StalledStream(io.StringIO):
    """A stdout whose reader has stopped: write() blocks until ``resume`` is set.
    ``entered`` is set when the first write() starts; ``written`` counts finished ones."""

    def __init__(self) -> None:
        super().__init__()
        self.resume = threading.Event()
        self.entered = threading.Event()
        self.written = 0

    def write(self, s: str) -> int:
        self.entered.set()
        self.resume.wait(10)
        self.written += 1
        return super().write(s)


def test_a_stalled_reader_never_blocks_the_caller_and_order_is_kept() -> None:
    out = StalledStream()
    sink = StdoutSink(out, queue_size=3)
    sink.write_many([b'{"n":0}'])
    assert out.entered.wait(5)  # the writer thread took it and is blocked in write()
    for i in range(1, 4):  # three fill the queue
        sink.write_many([f'{{"n":{i}}}'.encode()])
    with pytest.raises(BlockingIOError):
        sink.write_many([b'{"n":99}'])
    # Every call above returned while the stream was still stalled: none waited on it.
    assert out.written == 0
    out.resume.set()
    sink.close()
    assert out.getvalue() == "".join(f'{{"n":{i}}}\n' for i in range(4))


def test_the_auditor_counts_what_the_mirror_refused() -> None:
    out = StalledStream()
    sink = StdoutSink(out, queue_size=1)
    m = AuditMetrics(CollectorRegistry())
    auditor = Auditor(None, producer=PRODUCER, metrics=m, mirrors=[sink])  # type: ignore[arg-type]
    for i in range(5):  # one taken by the (blocked) writer, one queued, three refused
        auditor.accepted(f'{{"n":{i}}}'.encode())
        if i == 0:
            assert out.entered.wait(5)
    sample = m.registry.get_sample_value
    assert sample("stepup_authz_audit_events_total", {"sink": "stdout", "result": "ok"}) == 2
    assert sample("stepup_authz_audit_events_total", {"sink": "stdout", "result": "error"}) == 3
    out.resume.set()
    sink.close()
    assert out.getvalue() == '{"n":0}\n{"n":1}\n'
