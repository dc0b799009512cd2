"""The audit trail end to end against a real Redis: Auditor -> stream -> exporter ->
archive -> verify; exporter restarts and kill -9; sink down; buffer full."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from authz.audit.archive import ArchiveWriter
from authz.audit.chain import SigningKey
from authz.audit.events import AuditEvent, EventType, encode_event
from authz.audit.exporter import Exporter
from authz.audit.mac import Producer, verify_entry
from authz.audit.metrics import AuditMetrics
from authz.audit.segments import list_segments
from authz.audit.sinks import Auditor, AuditUnavailable, RedisStreamSink
from authz.audit.testing import MemorySink, StreamWriter, make_ring, sample_event
from authz.audit.verify import verify
from authz.store.connections import EmbeddedValkey
from authz.store.fastredis import FastRedis
from tests.builders import async_wait_until, wait_until

pytestmark = pytest.mark.integration

KEY = SigningKey.generate()
KEYS = {KEY.key_id: KEY.private_key.public_key()}
RING = make_ring()


@pytest.fixture
def stream(redis_prefix: str) -> str:
    return f"{redis_prefix}audit"


@pytest.fixture
async def aclient(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
def sclient(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def metrics() -> AuditMetrics:
    return AuditMetrics(CollectorRegistry())


def value(m: AuditMetrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def exporter(sclient: redis.Redis, archive: Path, stream: str, **kw: int) -> Exporter:
    w = ArchiveWriter(
        archive,
        KEY,
        max_bytes=kw.pop("max_bytes", 16_384),
        checkpoint_every=kw.pop("checkpoint_every", 25),
    )
    return Exporter(
        sclient, w, stream_key=stream, ring=RING, batch_size=kw.pop("batch", 100), metrics=metrics()
    )


def drain(ex: Exporter, limit: int = 1000) -> int:
    total = 0
    for _ in range(limit):
        n = ex.poll(block_ms=None)
        total += n
        if n == 0 and not ex.client.xrange(ex.stream_key, min=f"({ex.last_id}", count=1):
            return total
    raise AssertionError("exporter did not drain the stream")


def archived_ids(archive: Path) -> list[str]:
    out = []
    for seg in list_segments([archive]):
        for raw in seg.read_bytes().split(b"\n"):
            if b'"kind":"event"' in raw:
                out.append(json.loads(raw)["event_id"])
    return out


async def test_auditor_to_archive_exactly_n_records(
    aclient: aioredis.Redis, sclient: redis.Redis, stream: str, tmp_path: Path
) -> None:
    m = metrics()
    mirror = MemorySink()
    auditor = Auditor(
        RedisStreamSink(aclient, stream_key=stream, deadline_ms=500),
        producer=Producer(RING, stream),
        metrics=m,
        buffer_size=1000,
        batch_size=64,
        mirrors=[mirror],
    )
    auditor.start()
    sent = []
    for i in range(300):
        ev = sample_event(i)
        sent.append(ev.event_id)
        if i % 10 == 0:
            await auditor.durable(ev)
        else:
            auditor.emit(ev)
    assert await auditor.flush(10)
    await auditor.aclose()
    # 300 records between the producer's announcement and its stop record.
    assert value(m, "stepup_authz_audit_events_total", sink="redis", result="ok") == 302
    assert value(m, "stepup_authz_audit_dropped_total") == 0
    assert len(mirror.records) == 302
    mirrored = [json.loads(r) for r in mirror.records]
    assert (mirrored[0]["type"], mirrored[-1]["type"]) == (
        "audit.producer_started",
        "audit.producer_stopped",
    )
    assert sorted(r["event_id"] for r in mirrored[1:-1]) == sorted(sent)

    ex = exporter(sclient, tmp_path, stream)
    ex.start()
    assert drain(ex) == 302
    ex.close()
    r = verify([tmp_path], public_keys=KEYS)
    assert r.ok and r.records == 302 and r.unsigned_tail == 0, r.error
    assert sorted(archived_ids(tmp_path)[1:-1]) == sorted(sent)
    assert ex.metrics is not None
    assert value(ex.metrics, "stepup_authz_audit_quarantined_total", reason="mac-missing") == 0
    assert ex.tracker.states == {}  # stopped cleanly, every number accounted for
    assert len(list_segments([tmp_path])) > 1
    # Trimmed only up to what is archived: the last archived entry is still there.
    assert sclient.xlen(stream) >= 1
    assert ex.metrics is not None
    assert value(ex.metrics, "stepup_authz_audit_lag_seconds") == 0


async def test_durable_writes_over_redis_py_and_the_fast_transport(
    aclient: aioredis.Redis, stream: str, redis_url: str
) -> None:
    """Audit before access over both transports: redis-py (Sentinel, Cluster) and the
    hot-path FastRedis; a WAIT that the replicas cannot satisfy is a refusal on either."""
    m = metrics()
    auditor = Auditor(
        RedisStreamSink(aclient, stream_key=stream, deadline_ms=500),
        producer=Producer(RING, stream),
        metrics=m,
    )
    ev = sample_event(1)
    await auditor.durable(ev)
    (_, hello), (_, fields) = await aclient.xrange(stream)
    assert fields[b"r"] == encode_event(ev)  # the record's bytes as built, MAC'd beside them
    first, second = verify_entry(RING, stream, hello), verify_entry(RING, stream, fields)
    assert (first.seq, second.seq) == (1, 2) and first.producer == second.producer
    assert json.loads(first.record)["type"] == "audit.producer_started"
    # WAIT for a replica that a standalone server does not have: not durable -> refused.
    strict = Auditor(
        RedisStreamSink(
            aclient, stream_key=stream, deadline_ms=500, wait_replicas=1, wait_timeout_ms=20
        ),
        producer=Producer(RING, stream),
        metrics=m,
    )
    with pytest.raises(AuditUnavailable, match="WAIT"):
        await strict.durable(sample_event(2))
    assert value(m, "stepup_authz_audit_events_total", sink="redis", result="error") == 1
    # The same through the hot-path transport: XADD and WAIT go out on one connection.
    fast = FastRedis.from_url(redis_url, connections=3)
    try:
        quick = Auditor(
            RedisStreamSink(aclient, stream_key=stream, deadline_ms=500, fast=fast),
            producer=Producer(RING, stream),
            metrics=m,
        )
        for i in range(3):
            await quick.durable(sample_event(10 + i))
        strict_fast = Auditor(
            RedisStreamSink(
                aclient,
                stream_key=stream,
                deadline_ms=500,
                wait_replicas=1,
                wait_timeout_ms=20,
                fast=fast,
            ),
            producer=Producer(RING, stream),
            metrics=m,
        )
        with pytest.raises(AuditUnavailable, match="WAIT"):
            await strict_fast.durable(sample_event(20))
    finally:
        await fast.aclose()
    assert value(m, "stepup_authz_audit_events_total", sink="redis", result="error") == 2


def test_exporter_restart_no_gaps_no_duplicates(
    sclient: redis.Redis, stream: str, tmp_path: Path
) -> None:
    w = StreamWriter(RING, stream)
    hello = w.hello()
    sclient.xadd(stream, hello)  # type: ignore[arg-type]
    ids = [json.loads(hello[b"r"])["event_id"]]
    for i in range(250):
        ev = sample_event(i)
        ids.append(ev.event_id)
        sclient.xadd(stream, w.fields(ev))  # type: ignore[arg-type]
    ex1 = exporter(sclient, tmp_path, stream, batch=40)
    ex1.start()
    for _ in range(3):
        ex1.poll(block_ms=None)
    ex1.writer.close(seal=False)  # stopped abruptly: no sealing checkpoint
    # A producer retry wrote one record twice (the same entry): archived once.
    dup = sample_event(7)
    again = w.fields(dup)
    sclient.xadd(stream, again)  # type: ignore[arg-type]
    sclient.xadd(stream, again)  # type: ignore[arg-type]
    ex2 = exporter(sclient, tmp_path, stream, batch=40)
    rp = ex2.start()
    assert rp.seq == 120
    # The producers' account came back from the last checkpoint and the records after it.
    assert ex2.tracker.states[w.producer.id].next == 121  # 120 archived: seq 1..120
    drain(ex2)
    ex2.close()
    assert ex2.duplicates == 1
    r = verify([tmp_path], public_keys=KEYS)
    assert r.ok and r.records == 252, r.error
    assert archived_ids(tmp_path) == [*ids, dup.event_id]
    assert ex2.metrics is not None
    assert sum(s.value for s in _samples(ex2.metrics, "stepup_authz_audit_quarantined_total")) == 0


def _samples(m: AuditMetrics, name: str) -> list[Any]:
    return [s for f in m.registry.collect() for s in f.samples if s.name == name]


def _archived_count(archive: Path) -> int:
    n = 0
    if not archive.exists():
        return 0
    for seg in list_segments([archive]):
        n += seg.read_bytes().count(b'"kind":"event"')
    return n


def _start_exporter(cfg: Path) -> subprocess.Popen[bytes]:
    with (cfg.parent / "exporter.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "authz.audit", "exporter", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def test_kill_9_mid_write_then_restart(
    redis_url: str, sclient: redis.Redis, stream: str, tmp_path: Path
) -> None:
    keyfile = tmp_path / "signing.pem"
    keyfile.write_bytes(KEY.private_pem())
    (tmp_path / "mac.key").write_bytes(RING.keys[RING.active])
    archive = tmp_path / "archive"
    cfg = tmp_path / "exporter.yaml"
    cfg.write_text(
        f"redis_url: {redis_url}\nstream_key: {stream}\narchive_dir: archive\n"
        "signing_key_file: signing.pem\nsegment_max_bytes: 65536\n"
        "checkpoint_every: 50\nbatch_size: 20\nblock_ms: 100\n"
        f"mac_keys: {{{RING.active}: mac.key}}\n"
    )
    w = StreamWriter(RING, stream)
    total = 4001  # the announcement and 4000 records
    pipe = sclient.pipeline(transaction=False)
    pipe.xadd(stream, w.hello())  # type: ignore[arg-type]
    for i in range(total // 2):
        pipe.xadd(stream, w.fields(sample_event(i)))  # type: ignore[arg-type]
    pipe.execute()
    proc = _start_exporter(cfg)
    try:
        # A real process writing files: wait until it is busy archiving.
        wait_until(lambda: _archived_count(archive) >= 300, "300 archived", timeout_s=20)
        # More records arrive while it is busy writing; then kill -9 mid-stream.
        pipe = sclient.pipeline(transaction=False)
        for i in range(total // 2, total - 1):
            pipe.xadd(stream, w.fields(sample_event(i)))  # type: ignore[arg-type]
        pipe.execute()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    at_kill = _archived_count(archive)
    assert 0 < at_kill < total
    # Make the crash window certain: a write cut short in the newest segment.
    newest = list_segments([archive])[-1]
    with newest.open("ab") as f:
        f.write(b'{"kind":"event","seq":99999,"event')
    assert verify([archive], public_keys=KEYS).torn is not None

    proc = _start_exporter(cfg)
    try:
        wait_until(lambda: _archived_count(archive) >= total, "all archived", timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert proc.returncode == 0, (tmp_path / "exporter.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    r = verify([archive], public_keys=KEYS)
    assert r.ok and r.torn is None and r.records == total, (r.error, r.records)
    assert r.unsigned_tail == 0  # SIGTERM sealed the tail
    ids = archived_ids(archive)
    assert len(ids) == len(set(ids)) == total
    assert list((archive / "torn").iterdir())  # the torn bytes were kept


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A TCP port that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


async def test_durable_raises_within_its_deadline_when_the_sink_hangs(blackhole: int) -> None:
    """The sink never answers and the client has no timeout of its own: only the durable
    write's 100 ms deadline can end the wait (wait_for turns a hang into a failure)."""
    c = aioredis.Redis(host="127.0.0.1", port=blackhole, socket_timeout=None)
    m = metrics()
    auditor = Auditor(
        RedisStreamSink(c, stream_key="s", deadline_ms=100),
        producer=Producer(RING, "s"),
        metrics=m,
    )
    with pytest.raises(AuditUnavailable) as info:
        await asyncio.wait_for(auditor.durable(sample_event(0)), 10)
    assert isinstance(info.value.__cause__, TimeoutError), info.value.__cause__
    await c.aclose(close_connection_pool=True)


async def test_sink_down_durable_refuses_and_buffer_overflow_is_counted(
    embedded_valkey: EmbeddedValkey,
) -> None:
    c = aioredis.Redis.from_url(embedded_valkey.url, socket_timeout=1)
    m = metrics()
    auditor = Auditor(
        RedisStreamSink(c, stream_key="audit", deadline_ms=200),
        producer=Producer(RING, "audit"),
        metrics=m,
        buffer_size=20,
        batch_size=5,
        max_backoff_s=0.05,
    )
    auditor.start()
    await auditor.durable(sample_event(0))
    await asyncio.to_thread(embedded_valkey.stop)
    with pytest.raises(AuditUnavailable) as refused:
        await auditor.durable(sample_event(1))
    # Refused by the connection at once, not ended by the 200 ms deadline.
    assert not isinstance(refused.value.__cause__, TimeoutError), refused.value.__cause__
    errors = {"sink": "redis", "result": "error"}
    failed = value(m, "stepup_authz_audit_events_total", **errors)
    for i in range(100):  # non-critical events while Redis is down
        auditor.emit(sample_event(100 + i))
        if i == 9:  # the drainer holds a batch and fails to write it
            await async_wait_until(
                lambda: value(m, "stepup_authz_audit_events_total", **errors) > failed,
                "the drainer to fail a batch",
            )
    dropped = value(m, "stepup_authz_audit_dropped_total")
    assert dropped >= 101 - 20 - 5  # at most buffer + one held batch survive
    kept = auditor.backlog
    # The refused durable record is queued again (stamped: it must land or count as lost).
    assert kept + dropped == 101
    await asyncio.to_thread(embedded_valkey.start)  # back, same port
    assert await auditor.flush(10)
    await auditor.aclose()
    # The first records went with the old server; the stop record ends the sequence.
    assert await c.xlen("audit") == kept + 1
    assert value(m, "stepup_authz_audit_dropped_total") == dropped
    await c.aclose()


async def test_emit_never_blocks_and_counts_drops_when_full(
    aclient: aioredis.Redis, stream: str
) -> None:
    m = metrics()
    auditor = Auditor(
        RedisStreamSink(aclient, stream_key=stream, deadline_ms=100),
        producer=Producer(RING, stream),
        metrics=m,
        buffer_size=10,
    )
    for i in range(25):  # the drainer is not running: the buffer fills
        auditor.emit(AuditEvent(EventType.ACCESS_DENIED, decision_id=str(i)))
    # emit() only buffers: nothing reached Redis, whatever the buffer's state.
    assert await aclient.xlen(stream) == 0
    assert value(m, "stepup_authz_audit_dropped_total") == 15
    assert value(m, "stepup_authz_audit_buffer_events") == 10
    auditor.start()
    assert await auditor.flush(5)
    await auditor.aclose()
    assert await aclient.xlen(stream) == 12  # the announcement, 10 records, the stop
