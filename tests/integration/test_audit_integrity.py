"""The trail against someone with Redis write access, and against the archive's storage
admins, through a real Redis, the real Auditor (MAC'd, numbered records), the real
exporter and the real `audit verify` / `audit export` / `audit head` commands.

Redis writer: a forged XADD is quarantined, counted and never archived as the record it
claims to be; a deleted entry hidden with XSETID ... MAXDELETEDID is reported as a gap.
Storage admin: a cut tail, a deleted newest segment, a rolled-back HEAD.json and records
forged after the last checkpoint each fail `audit verify` with their place; a clean
archive verifies. Bad input to the commands is a message and a non-zero exit.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from authz.audit.chain import SigningKey, record_hash
from authz.audit.cli import main as audit_main
from authz.audit.config import ExporterSettings
from authz.audit.events import canonical_bytes
from authz.audit.export import read_records
from authz.audit.exporter import Exporter, build_exporter
from authz.audit.mac import MacKeyRing, Producer
from authz.audit.metrics import AuditMetrics
from authz.audit.segments import list_segments
from authz.audit.sinks import Auditor, RedisStreamSink
from authz.audit.testing import StreamWriter, make_ring, sample_event, write_mac_key

pytestmark = pytest.mark.integration

SIGNING = SigningKey.generate()


@dataclass
class Trail:
    """One producer's stream and its exporter's archive (keys on disk, as deployed)."""

    stream: str
    redis_url: str
    dir: Path
    settings: ExporterSettings
    ring: MacKeyRing

    @property
    def archive(self) -> Path:
        return self.settings.archive_dir

    @property
    def pubkey(self) -> Path:
        return self.dir / "signing.pub.pem"

    def exporter(self, clock: list[float] | None = None) -> Exporter:
        ex = build_exporter(self.settings, CollectorRegistry())
        if clock is not None:
            ex.clock = lambda: clock[0]
        ex.start()
        return ex

    def auditor(self, client: aioredis.Redis) -> Auditor:
        return Auditor(
            RedisStreamSink(client, stream_key=self.stream, deadline_ms=1000),
            producer=Producer(self.ring, self.stream),
            metrics=AuditMetrics(CollectorRegistry()),
        )


@pytest.fixture
def trail(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[Trail]:
    (tmp_path / "signing.pem").write_bytes(SIGNING.private_pem())
    (tmp_path / "signing.pub.pem").write_bytes(SIGNING.public_pem())
    mac = write_mac_key(tmp_path / "secrets" / "audit-mac-k1.key")
    (tmp_path / "other-volume").mkdir()
    settings = ExporterSettings.model_validate(
        {
            "redis_url": redis_url,
            "stream_key": f"{redis_prefix}audit",
            "archive_dir": tmp_path / "archive",
            "signing_key_file": tmp_path / "signing.pem",
            "mac_keys": {"k1": mac},
            "head_file": tmp_path / "other-volume" / "head.json",
            "segment_max_bytes": 4096,
            "checkpoint_every": 5,
            "batch_size": 7,
            "reorder_window_s": 10,
        }
    )
    ring = MacKeyRing.from_files({"k1": mac}, "k1")
    yield Trail(settings.stream_key, redis_url, tmp_path, settings, ring)
    c = redis.Redis.from_url(redis_url)
    c.delete(settings.stream_key + ":head")
    c.close()


@pytest.fixture
async def aclient(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


def drain(ex: Exporter) -> None:
    for _ in range(1000):
        if ex.poll(block_ms=None) == 0:
            return
    raise AssertionError("the exporter did not catch up")


def events(archive: Path) -> list[dict[str, Any]]:
    return read_records([archive])


def value(ex: Exporter, name: str, **labels: str) -> float:
    assert ex.metrics is not None
    v = ex.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = audit_main(["audit", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# -- a Redis writer ---------------------------------------------------------------------------


async def test_forged_entries_are_quarantined_counted_and_never_archived_as_genuine(
    trail: Trail, aclient: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    auditor = trail.auditor(aclient)
    genuine = [sample_event(i) for i in range(6)]
    for ev in genuine[:3]:
        await auditor.durable(ev)
    # The attacker's story: XADD an allow for mallory, as a bare record; as a MAC'd entry
    # under a key of their own claiming the real producer; and, having the key but not the
    # stream's history, from a producer that never announced itself.
    forged = [
        dataclasses.replace(sample_event(100 + i), user="https://idp.example|mallory")
        for i in range(3)
    ]
    sc = redis.Redis.from_url(trail.redis_url)
    sc.xadd(trail.stream, {b"r": canonical_bytes(forged[0].to_record())})
    impostor = StreamWriter(make_ring("k1"), trail.stream, auditor.producer.id)
    impostor.producer.seq = auditor.producer.seq  # the next number, as a real one would be
    sc.xadd(trail.stream, impostor.fields(forged[1]))  # type: ignore[arg-type]
    sc.xadd(trail.stream, StreamWriter(trail.ring, trail.stream).fields(forged[2]))  # type: ignore[arg-type]
    for ev in genuine[3:]:
        await auditor.durable(ev)
    await auditor.aclose()

    ex = trail.exporter()
    drain(ex)
    ex.close()
    ex.client.close()
    recs = events(trail.archive)
    by_id = {r["event_id"] for r in recs}
    assert not by_id & {ev.event_id for ev in forged}  # never under the forged identity
    assert {ev.event_id for ev in genuine} <= by_id
    assert not [r for r in recs if r.get("user") == "https://idp.example|mallory"]
    kept = [r for r in recs if r["type"] == "audit.quarantined"]
    assert [r["reason"] for r in kept] == ["mac-missing", "mac-invalid", "unknown-producer"]
    assert all(forged[i].event_id in r["raw"] for i, r in enumerate(kept))  # kept, marked
    assert kept[1]["claimed_producer"] == auditor.producer.id
    assert all("producer" not in r for r in kept)  # no producer vouches for them
    genuine_recs = [r for r in recs if r["type"] != "audit.quarantined"]
    assert {r["producer"] for r in genuine_recs} == {auditor.producer.id}
    assert [r["producer_seq"] for r in genuine_recs] == list(range(1, 9))  # no gap
    for reason in ("mac-missing", "mac-invalid", "unknown-producer"):
        assert value(ex, "stepup_authz_audit_quarantined_total", reason=reason) == 1
    assert value(ex, "stepup_authz_audit_missing_records_total") == 0
    # The archive itself is intact (the forgeries are in it, as what they are) ...
    code, out, _ = cli(
        capsys, "verify", "--pubkey", trail.pubkey, "--require-sealed", trail.archive
    )
    assert code == 0, out
    # ... and an examiner's export of allows holds only the genuine ones.
    code, out, _ = cli(capsys, "export", "--type", "access.allowed", trail.archive)
    assert code == 0
    exported = {json.loads(line)["event_id"] for line in out.splitlines()}
    assert exported == {ev.event_id for ev in genuine if ev.type == "access.allowed"}
    sc.close()


async def test_a_deleted_entry_hidden_with_xsetid_is_reported_as_a_gap(
    trail: Trail, aclient: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    auditor = trail.auditor(aclient)
    sent = [sample_event(i) for i in range(8)]
    for ev in sent:
        await auditor.durable(ev)
    sc = redis.Redis.from_url(trail.redis_url)
    entries: Any = sc.xrange(trail.stream)
    victim_id, victim = entries[5]  # seq 6: the announcement is seq 1
    assert json.loads(victim[b"r"])["event_id"] == sent[4].event_id
    sc.xdel(trail.stream, victim_id)
    # Hide it from the stream's bookkeeping: no deleted id past 0-1, as if none ever was.
    last = entries[-1][0].decode()
    sc.execute_command("XSETID", trail.stream, last, "MAXDELETEDID", "0-1")
    info: Any = sc.xinfo_stream(trail.stream)
    assert info["max-deleted-entry-id"] in (b"0-1", "0-1")

    clock = [time.time()]
    ex = trail.exporter(clock)
    drain(ex)
    assert [r for r in events(trail.archive) if r["type"] == "audit.gap"] == []  # may be late
    clock[0] += 11  # past the reorder window: the number is missing, not late
    await auditor.durable(sample_event(99))
    drain(ex)
    ex.close()
    ex.client.close()
    await auditor.aclose()
    recs = events(trail.archive)
    (gap,) = [r for r in recs if r["type"] == "audit.gap"]
    assert (gap["of_producer"], gap["first_missing"], gap["last_missing"], gap["missing"]) == (
        auditor.producer.id,
        6,
        6,
        1,
    )
    assert sent[4].event_id not in {r["event_id"] for r in recs}
    assert value(ex, "stepup_authz_audit_missing_records_total") == 1
    code, out, _ = cli(capsys, "export", "--type", "audit.gap", trail.archive)
    assert code == 0 and json.loads(out)["first_missing"] == 6
    sc.close()


def test_the_exporter_process_counts_a_forgery_on_its_metrics(trail: Trail, tmp_path: Path) -> None:
    """The alert's input, from the running exporter (k8s/prometheus/rules_test.yaml shows
    StepupAuthzAuditQuarantined firing on it)."""
    from authz.demo.stack import free_ports

    (port,) = free_ports(1)
    cfg = tmp_path / "exporter.yaml"
    doc = json.loads(trail.settings.model_dump_json())
    doc.update(metrics_port=port, block_ms=100)
    cfg.write_text(json.dumps(doc))  # JSON is YAML
    sc = redis.Redis.from_url(trail.redis_url)
    sc.xadd(trail.stream, {b"r": canonical_bytes(sample_event(1).to_record())})
    log = (tmp_path / "exporter.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz.audit", "exporter", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    want = 'stepup_authz_audit_quarantined_total{reason="mac-missing"} 1.0'
    try:
        deadline = time.monotonic() + 20  # the process starts and polls on its own timer
        text = ""
        while time.monotonic() < deadline and want not in text:
            try:
                with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
                    text = r.read().decode()
            except OSError:
                pass
            time.sleep(0.1)
        assert want in text, (tmp_path / "exporter.log").read_text()[-2000:]
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        sc.close()
    assert proc.returncode == 0
    text = (tmp_path / "exporter.log").read_text()
    assert "audit stream entry quarantined" in text
    # The head it published to its log (for the log collectors) is one `verify --head` takes.
    head_line = [line for line in text.splitlines() if '"msg": "audit head"' in line][-1]
    (tmp_path / "head-from-log.json").write_text(head_line)
    code = audit_main(
        [
            "audit",
            "verify",
            "--pubkey",
            str(trail.pubkey),
            "--head",
            str(tmp_path / "head-from-log.json"),
            "--require-sealed",
            str(trail.archive),
        ]
    )
    assert code == 0


# -- the archive's storage admins ----------------------------------------------------------------


@dataclass
class Built:
    trail: Trail
    old_head: Path  # HEAD.json as it was half way through
    published: Path  # the newest head, fetched from the stream with `audit head`


@pytest.fixture
async def built(trail: Trail, aclient: aioredis.Redis, capsys: pytest.CaptureFixture[str]) -> Built:
    auditor = trail.auditor(aclient)
    ex = trail.exporter()
    for i in range(40):
        await auditor.durable(sample_event(i))
        if i == 20:
            drain(ex)
            shutil.copy(trail.archive / "HEAD.json", trail.dir / "old-head.json")
    await auditor.aclose()
    drain(ex)
    ex.close()  # the shutdown checkpoint: the archive at rest is sealed
    ex.client.close()
    published = trail.dir / "published-head.json"
    code, _, err = cli(
        capsys,
        "head",
        "--redis-url",
        trail.redis_url,
        "--stream",
        trail.stream,
        "--output",
        published,
    )
    assert code == 0, err
    assert json.loads(published.read_text()) == json.loads(
        (trail.archive / "HEAD.json").read_text()
    )
    assert published.read_text() == (trail.dir / "other-volume" / "head.json").read_text()
    assert len(list_segments([trail.archive])) >= 4
    return Built(trail, trail.dir / "old-head.json", published)


def copy_of(b: Built, name: str) -> Path:
    dst = b.trail.dir / name
    shutil.copytree(b.trail.archive, dst, ignore=shutil.ignore_patterns(".lock"))
    for p in dst.iterdir():
        if p.is_file():
            p.chmod(0o640)  # sealed segments are read-only
    return dst


def verify_cli(
    capsys: pytest.CaptureFixture[str], b: Built, archive: Path, *extra: str | Path
) -> tuple[int, str]:
    code, out, err = cli(capsys, "verify", "--pubkey", b.trail.pubkey, *extra, archive)
    return code, out + err


def newest_with_records(archive: Path) -> Path:
    return [s for s in list_segments([archive]) if b'"kind":"event"' in s.read_bytes()][-1]


def test_a_clean_archive_verifies_sealed_against_its_published_head(
    built: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = verify_cli(
        capsys, built, built.trail.archive, "--head", built.published, "--require-sealed"
    )
    assert code == 0, out
    assert out.rstrip().endswith("OK") and "UNVERIFIED TAIL" not in out
    assert f"head checked: {built.published}" in out


def test_a_cut_tail_fails_with_its_place(built: Built, capsys: pytest.CaptureFixture[str]) -> None:
    a = copy_of(built, "cut")
    seg = newest_with_records(a)
    for later in list_segments([a]):
        if later.name > seg.name:  # the empty segment a seal opened: made to look unborn
            later.unlink()
    lines = seg.read_bytes().split(b"\n")[:-1]
    seg.write_bytes(b"\n".join(lines[:-4]) + b"\n")  # 3 records and the last checkpoint
    code, out = verify_cli(capsys, built, a)
    assert code == 1
    assert f"FAILED: first broken link: truncated: {seg.name}:0" in out  # HEAD.json knew
    # Cut together with HEAD.json rolled back to an old copy: the published head knows.
    shutil.copy(built.old_head, a / "HEAD.json")
    assert verify_cli(capsys, built, a)[0] == 0  # alone, the archive cannot tell
    code, out = verify_cli(capsys, built, a, "--head", built.published)
    assert code == 1 and f"truncated: {seg.name}:0" in out and "cut off the end" in out


def test_a_deleted_newest_segment_fails_with_its_name(
    built: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    a = copy_of(built, "deleted")
    segs = list_segments([a])
    gone = segs[-1]
    gone.unlink()
    (a / "HEAD.json").unlink()  # the admin takes HEAD.json too: the seal before still names it
    code, out = verify_cli(capsys, built, a)
    assert code == 1
    assert f"deleted: {gone.name}:0" in out and f"the seal of {segs[-2].name}" in out
    code, out = verify_cli(capsys, built, a, "--head", built.published)
    assert code == 1 and f"deleted: {gone.name}:0" in out


def test_a_rolled_back_head_fails(built: Built, capsys: pytest.CaptureFixture[str]) -> None:
    a = copy_of(built, "rolled-back")
    shutil.copy(built.old_head, a / "HEAD.json")  # the records are all there
    code, out = verify_cli(capsys, built, a, "--head", built.published)
    assert code == 1
    old_seq = json.loads(built.old_head.read_text())["seq"]
    assert f"head-rolled-back: {a / 'HEAD.json'}:0 seq {old_seq}" in out
    # The whole archive rolled back to that head: the segments after it deleted, the one
    # it names cut back to it.
    old = json.loads(built.old_head.read_text())
    for seg in list_segments([a]):
        if seg.name > old["segment"]:
            seg.unlink()
    seg = a / old["segment"]
    keep = []
    for line in seg.read_bytes().split(b"\n")[:-1]:
        keep.append(line)
        if line == canonical_bytes(old):
            break
    seg.write_bytes(b"\n".join(keep) + b"\n")
    code, out = verify_cli(capsys, built, a)
    if "next_segment" in old:  # the old head is a seal: it names the segment cut away
        assert code == 1 and f"deleted: {old['next_segment']}:0" in out
    else:  # consistent with its own HEAD.json: alone, the archive cannot tell
        assert code == 0, out
    code, out = verify_cli(capsys, built, a, "--head", built.published)
    first_gone = old.get("next_segment") or json.loads(built.published.read_text())["segment"]
    assert code == 1 and f"deleted: {first_gone}:0" in out
    assert "the newest segment(s) were deleted" in out


def test_records_forged_after_the_last_checkpoint_are_an_unverified_tail(
    built: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    a = copy_of(built, "forged")
    seg = list_segments([a])[-1]  # the newest segment: the only one that may grow
    last = events(a)[-1]
    prev, seq, forged = last["hash"], last["seq"], []
    for i in range(3):  # chained exactly as the exporter would: SHA-256 needs no key
        rec = {**sample_event(500 + i).to_record(), "kind": "event", "seq": seq + 1 + i}
        rec.update(stream_id="9999999999999-0", prev_hash=prev, producer="p", producer_seq=1)
        rec["hash"] = prev = record_hash(prev, rec)
        forged.append(canonical_bytes(rec))
    data = seg.read_bytes()
    first_line = data.count(b"\n") + 1
    seg.write_bytes(data + b"\n".join(forged) + b"\n")
    code, out = verify_cli(capsys, built, a, "--head", built.published)
    assert code == 0, out  # a live archive always has a tail ...
    assert f"UNVERIFIED TAIL: unverified-tail: {seg.name}:{first_line} seq {seq + 1}" in out
    assert "3 record(s) after the newest checkpoint" in out
    code, out = verify_cli(capsys, built, a, "--require-sealed")  # ... one at rest has none
    assert code == 1
    assert f"FAILED: first broken link: unverified-tail: {seg.name}:{first_line}" in out


def test_records_forged_after_a_seal_are_inserted(
    built: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    a = copy_of(built, "after-seal")
    sealed = [s for s in list_segments([a]) if b'"next_segment"' in s.read_bytes()][-1]
    data = sealed.read_bytes()
    line = data.split(b"\n")[-3]  # a record of its own, appended after its seal
    sealed.write_bytes(data + line + b"\n")
    code, out = verify_cli(capsys, built, a)
    n = data.count(b"\n")
    assert code == 1 and f"inserted: {sealed.name}:{n + 1}: a line after the seal" in out


# -- bad input to the commands -----------------------------------------------------------------


def test_bad_input_gets_a_message_and_a_non_zero_exit(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arch = built.trail.archive
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\xff\x00 not a key\n")
    not_json = tmp_path / "head.txt"
    not_json.write_text("{nope")
    not_cp = tmp_path / "head.json"
    not_cp.write_text('{"kind":"event","seq":1}')
    other = tmp_path / "other.pub.pem"
    other.write_bytes(SigningKey.generate().public_pem())
    cases: list[tuple[list[str | Path], int, str]] = [
        (["verify", tmp_path / "missing"], 2, "no such file"),
        (["verify", "--pubkey", tmp_path / "missing.pem", arch], 2, "No such file"),
        (["verify", "--pubkey", garbage, arch], 2, "not an Ed25519 public key PEM"),
        (["verify", "--pubkey", other, arch], 1, "unknown key id"),
        (["verify", "--head", not_json, arch], 2, "not JSON"),
        (["verify", "--head", not_cp, arch], 2, "not a checkpoint"),
        (["verify", "--require-sealed", arch], 2, "needs --pubkey"),
        (["verify", tmp_path], 1, "no segment files"),
        (["export", "--since", "yesterday-ish", arch], 2, "yesterday-ish"),
        (["export", "--output", tmp_path / "no" / "such" / "dir.csv", arch], 2, "No such file"),
        (["export", "--pubkey", other, arch], 1, "refused"),
    ]
    for args, code, message in cases:
        got, out, err = cli(capsys, *args)
        assert (got, message in out + err) == (code, True), (args, out, err)
    # Garbage lines (text and raw bytes) in a copy: named, and export refuses them.
    a = copy_of(built, "garbage")
    seg = list_segments([a])[1]
    lines = seg.read_bytes().split(b"\n")
    seg.write_bytes(b"\n".join([lines[0], b"not json at all", b"\xff\xfe\x00", *lines[1:]]))
    got, out, _ = cli(capsys, "verify", a)
    assert got == 1 and f"malformed: {seg.name}:2" in out
    got, _, err = cli(capsys, "export", a)
    assert got == 1 and "refused" in err and f"{seg.name}:2" in err
    got, out, err = cli(capsys, "export", "--force", a)
    assert got == 0 and len(out.splitlines()) == len(events(arch))


@pytest.mark.parametrize(
    "args",
    [["verify", "/nonexistent/archive"], ["export", "--head", "/etc/hostname", "/tmp"]],
)
def test_the_real_command_prints_no_traceback(args: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "authz.audit", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith(f"audit {args[0]}: ")
