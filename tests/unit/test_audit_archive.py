"""ArchiveWriter recovery and rotation, and `audit export` (no Redis needed)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from authz.audit.archive import ArchiveError, ArchiveWriter
from authz.audit.chain import SigningKey
from authz.audit.cli import main as audit_main
from authz.audit.export import ExportRefused, Filter, parse_time, select, write_csv
from authz.audit.segments import list_segments
from authz.audit.testing import make_ring, sample_archive, sample_event
from authz.audit.verify import verify

KEY = SigningKey.generate()
KEYS = {KEY.key_id: KEY.private_key.public_key()}


def test_reopen_continues_the_chain_and_stream_position(tmp_path: Path) -> None:
    sample_archive(tmp_path, KEY, 10)
    w = ArchiveWriter(tmp_path, KEY, max_bytes=4096, checkpoint_every=4)
    rp = w.open()
    assert (rp.seq, rp.stream_id, rp.torn_copy) == (10, "1700000000009-0", None)
    assert len(rp.recent_ids) == len(set(rp.recent_ids)) > 0
    w.append([("1700000000010-0", sample_event(10).to_record())])
    w.close()
    r = verify([tmp_path], public_keys=KEYS)
    assert r.ok and r.records == 11, r.error


def test_a_torn_last_line_is_cut_kept_and_writing_resumes(tmp_path: Path) -> None:
    w = sample_archive(tmp_path, KEY, 6, max_bytes=1 << 20, close=False)
    w.close(seal=False)  # as after kill -9: no sealing checkpoint
    seg = list_segments([tmp_path])[-1]
    with seg.open("ab") as f:
        f.write(b'{"kind":"event","seq":7,"us')  # a write cut short
    assert verify([tmp_path], public_keys=KEYS).torn is not None
    w2 = ArchiveWriter(tmp_path, KEY, checkpoint_every=100)
    rp = w2.open()
    assert rp.seq == 6 and rp.torn_copy is not None
    assert rp.torn_copy.read_bytes() == b'{"kind":"event","seq":7,"us'
    w2.append([("1700000000006-0", sample_event(6).to_record())])
    w2.close()
    r = verify([tmp_path], public_keys=KEYS)
    assert r.ok and r.torn is None and r.records == 7 and r.unsigned_tail == 0


def test_one_writer_per_archive(tmp_path: Path) -> None:
    w = ArchiveWriter(tmp_path, KEY)
    w.open()
    with pytest.raises(ArchiveError, match="another exporter"):
        ArchiveWriter(tmp_path, KEY).open()
    w.close()


def test_rotation_by_size_and_age_seals_read_only_segments(tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    w = ArchiveWriter(
        tmp_path, KEY, max_bytes=1 << 20, max_age_s=60, checkpoint_every=1000, clock=lambda: now[0]
    )
    w.open()
    w.append([("1-0", sample_event(0).to_record())])
    now[0] += 61
    assert w.maybe_rotate()
    w.append([("2-0", sample_event(1).to_record())])
    w.close()
    s = list_segments([tmp_path])
    assert len(s) == 2 and not s[0].stat().st_mode & 0o200
    assert s[1].name.startswith("audit-0000000000000002-")
    assert verify([tmp_path], public_keys=KEYS).ok


def test_a_seal_names_the_next_segment_which_exists_before_it(tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    w = ArchiveWriter(tmp_path, KEY, max_bytes=1 << 20, max_age_s=60, clock=lambda: now[0])
    w.open()
    w.append([("1-0", sample_event(0).to_record())])
    now[0] += 61
    assert w.maybe_rotate()
    old, new = list_segments([tmp_path])
    seal = json.loads(old.read_bytes().split(b"\n")[-2])
    assert seal["kind"] == "checkpoint" and seal["next_segment"] == new.name
    assert new.stat().st_size == 0  # created (empty) before the seal named it
    w.close()
    assert verify([tmp_path], public_keys=KEYS).ok


def test_recovery_after_a_crash_between_the_seal_and_the_next_segment(tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    w = ArchiveWriter(tmp_path, KEY, max_bytes=1 << 20, max_age_s=60, clock=lambda: now[0])
    w.open()
    w.append([("1-0", sample_event(0).to_record())])
    now[0] += 61
    w.maybe_rotate()
    w.close()
    _, new = list_segments([tmp_path])
    new.unlink()  # as if the process died after the seal, before the file existed
    assert verify([tmp_path], public_keys=KEYS).error is not None
    w2 = ArchiveWriter(tmp_path, KEY, clock=lambda: now[0])
    w2.open()
    assert new.exists()  # recreated under the name the seal gave it
    w2.append([("2-0", sample_event(1).to_record())])
    w2.close()
    r = verify([tmp_path], public_keys=KEYS)
    assert r.ok and r.records == 2, r.error


def test_recovery_after_a_crash_between_the_next_segment_and_the_seal(tmp_path: Path) -> None:
    w = ArchiveWriter(tmp_path, KEY, max_bytes=1 << 20)
    w.open()
    w.append([("1-0", sample_event(0).to_record())])
    w.close(seal=False)
    (tmp_path / "audit-0000000000000002-20991231T000000Z.jsonl").write_bytes(b"")
    w2 = ArchiveWriter(tmp_path, KEY)
    w2.open()  # the empty successor of an unsealed segment is removed: writing goes on
    assert len(list_segments([tmp_path])) == 1
    w2.append([("2-0", sample_event(1).to_record())])
    w2.close()
    r = verify([tmp_path], public_keys=KEYS, require_sealed=True)
    assert r.ok and r.records == 2, r.error


def test_heads_go_to_head_file_and_the_callback(tmp_path: Path) -> None:
    heads: list[dict[str, object]] = []
    other = tmp_path / "other-volume"
    other.mkdir()
    w = ArchiveWriter(tmp_path / "a", KEY, checkpoint_every=1, head_file=other / "head.json")
    w.on_checkpoint = lambda cp: heads.append(dict(cp))
    w.state = lambda: {"p": {"next": 2}}
    w.open()
    w.append([("1-0", sample_event(0).to_record())])
    w.close()
    assert heads and heads[-1]["producers"] == {"p": {"next": 2}}
    assert json.loads((other / "head.json").read_text()) == heads[-1]
    assert json.loads((tmp_path / "a" / "HEAD.json").read_text()) == heads[-1]


def test_export_filters_sorts_and_writes_csv(tmp_path: Path) -> None:
    sample_archive(tmp_path, KEY, 30)
    since = 1_700_000_000_000 + 5_000
    until = 1_700_000_000_000 + 25_000
    recs, _ = select(
        [tmp_path],
        Filter(since_ms=since, until_ms=until, users=frozenset({"https://idp.example|user1"})),
    )
    assert [r["seq"] for r in recs] == [i + 1 for i in range(5, 25) if i % 3 == 1]
    recs, _ = select([tmp_path], Filter(types=frozenset({"access.allowed"})))
    assert len(recs) == 7 and all(r["type"] == "access.allowed" for r in recs)
    assert [r["ts_ms"] for r in recs] == sorted(r["ts_ms"] for r in recs)
    out = io.StringIO()
    write_csv(recs, out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 7 and rows[0]["type"] == "access.allowed"
    assert rows[0]["time_utc"].endswith("Z") and json.loads(rows[0]["details"])["acr"] == "mfa"


def test_csv_escapes_controls_and_formulas() -> None:
    rec = {
        "seq": 1,
        "ts_ms": 0,
        "type": "access.denied",
        "device": '=HYPERLINK("x")\n',
        "route": "GET h /a\x1b[31m",
    }
    out = io.StringIO()
    write_csv([rec], out)
    text = out.getvalue()
    assert "\x1b" not in text and "\\u001b" in text
    row = next(csv.DictReader(io.StringIO(text)))
    assert row["device"].startswith("'=") and row["device"].endswith("\\u000a")


def test_export_refuses_a_broken_archive(tmp_path: Path) -> None:
    sample_archive(tmp_path, KEY, 10)
    seg = list_segments([tmp_path])[0]
    seg.chmod(0o640)
    seg.write_bytes(seg.read_bytes().replace(b"user1", b"userX", 1))
    with pytest.raises(ExportRefused):
        select([tmp_path], Filter())
    recs, report = select([tmp_path], Filter(), force=True)
    assert not report.ok and len(recs) == 10


def test_cli_export_jsonl_is_complete_and_sorted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample_archive(tmp_path / "a", KEY, 20)
    rc = audit_main(
        [
            "audit",
            "export",
            str(tmp_path / "a"),
            "--since",
            "2023-11-14T22:13:25Z",
            "--type",
            "stepup.challenge,stepup.completed",
        ]
    )
    assert rc == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {r["type"] for r in out} == {"stepup.challenge", "stepup.completed"}
    assert all(r["ts_ms"] >= parse_time("2023-11-14T22:13:25Z") for r in out)
    expected = [
        i + 1
        for i in range(20)
        if i % 4 in (0, 1) and 1_700_000_000_000 + i * 1000 >= parse_time("2023-11-14T22:13:25Z")
    ]
    assert [r["seq"] for r in out] == expected and expected


def test_parse_time() -> None:
    assert parse_time("1700000000000") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20") == 1_700_000_000_000
    assert parse_time("2023-11-14T23:13:20+01:00") == 1_700_000_000_000


class _Stop:
    """A stand-in for threading.Event that records how long it was asked to wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return False


@pytest.mark.parametrize(("read", "waits"), [(0, []), (1, [0.1]), (499, [0.1]), (500, [])])
def test_exporter_lingers_only_after_a_partial_batch(read: int, waits: list[float]) -> None:
    """A partial batch: wait for more records (one fsync for many); an empty read already
    blocked in XREAD; a full batch means a backlog, read on at once."""
    from authz.audit.exporter import Exporter

    ex = Exporter(None, None, stream_key="s", ring=make_ring(), batch_size=500)  # type: ignore[arg-type]
    stop = _Stop()
    ex.linger(read, stop, 100)  # type: ignore[arg-type]
    assert stop.waits == waits
    ex.linger(read, stop, 0)  # type: ignore[arg-type]
    assert stop.waits == waits
