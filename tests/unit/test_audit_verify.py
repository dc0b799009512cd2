"""Chain, checkpoints and `audit verify` against tampered copies of a generated archive."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from authz.audit.chain import (
    GENESIS,
    SigningKey,
    chain_line,
    chain_record,
    checkpoint_signature_ok,
    load_public_keys,
    record_hash,
)
from authz.audit.cli import main as audit_main
from authz.audit.events import ARCHIVE_FIELDS, canonical_bytes
from authz.audit.segments import list_segments
from authz.audit.testing import sample_archive
from authz.audit.verify import verify

KEY = SigningKey.generate()
KEYS = {KEY.key_id: KEY.private_key.public_key()}


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    d = tmp_path / "archive"
    sample_archive(d, KEY, 30)
    return d


def segs(d: Path) -> list[Path]:
    return list_segments([d])


def lines(p: Path) -> list[bytes]:
    return p.read_bytes().split(b"\n")[:-1]


def put(p: Path, ls: list[bytes], *, tail: bytes = b"\n") -> None:
    p.chmod(0o640)
    p.write_bytes(b"\n".join(ls) + (tail if ls else b""))


def event_lines(p: Path) -> list[int]:
    """0-based indexes of the event lines of a segment."""
    return [i for i, raw in enumerate(lines(p)) if b'"kind":"event"' in raw]


def test_chain_and_checkpoint_sign_and_verify() -> None:
    r1 = chain_record({"type": "x", "ts_ms": 1}, seq=1, stream_id="1-0", prev_hash=GENESIS)
    r2 = chain_record({"type": "y", "ts_ms": 2}, seq=2, stream_id="2-0", prev_hash=r1["hash"])
    assert record_hash(GENESIS, r1) == r1["hash"] and r2["prev_hash"] == r1["hash"]
    assert record_hash(r1["hash"], {**r2, "type": "z"}) != r2["hash"]
    cp = KEY.checkpoint(segment="s.jsonl", seq=2, hash_=r2["hash"], ts_ms=3)
    assert cp["key_id"] == KEY.key_id and checkpoint_signature_ok(cp, KEYS) == ""
    assert checkpoint_signature_ok({**cp, "seq": 3}, KEYS) == "bad signature"
    other = SigningKey.generate()
    assert "unknown key id" in checkpoint_signature_ok(
        other.checkpoint(segment="s", seq=1, hash_="h", ts_ms=1), KEYS
    )


def test_public_keys_load_from_pem_files(tmp_path: Path) -> None:
    (tmp_path / "k.pub.pem").write_bytes(KEY.public_pem())
    (tmp_path / "k.pem").write_bytes(KEY.private_pem())
    assert load_public_keys([tmp_path / "k.pub.pem"]).keys() == KEYS.keys()
    assert load_public_keys([tmp_path / "k.pem"]).keys() == KEYS.keys()


def test_a_clean_archive_verifies(archive: Path) -> None:
    assert len(segs(archive)) >= 4  # the tamper cases below need several segments
    r = verify([archive], public_keys=KEYS)
    assert r.ok and r.exit_code == 0, r.error
    assert (r.records, r.first_seq, r.last_seq) == (30, 1, 30)
    assert r.signed_through == 30 and r.unsigned_tail == 0  # close() sealed the tail
    assert r.checkpoints >= len(segs(archive))


def test_without_keys_the_chain_is_checked_and_the_gap_is_said(archive: Path) -> None:
    r = verify([archive])
    assert r.ok and not r.signatures_checked and "NOT checked" in r.notes[0]


def test_edit_a_field(archive: Path) -> None:
    seg = segs(archive)[1]
    ls = lines(seg)
    i = event_lines(seg)[1]
    doc = json.loads(ls[i])
    doc["user"] = "https://idp.example|mallory"
    ls[i] = canonical_bytes(doc)
    put(seg, ls)
    r = verify([archive], public_keys=KEYS)
    assert r.error is not None and r.exit_code == 1
    assert (r.error.kind, r.error.segment, r.error.line) == ("modified", seg.name, i + 1)
    assert r.error.record_id == doc["event_id"] and r.error.seq == doc["seq"]


def test_edit_a_field_and_recompute_the_whole_chain_is_caught_by_signatures(archive: Path) -> None:
    """SHA-256 is keyless: a rewritten chain is consistent, but its checkpoints are not."""
    prev = GENESIS
    for seg in segs(archive):
        ls = lines(seg)
        for i, raw in enumerate(ls):
            doc = json.loads(raw)
            if doc["kind"] != "event":
                continue
            if doc["seq"] == 7:
                doc["reason"] = "nothing-to-see"
            doc["prev_hash"] = prev
            doc["hash"] = record_hash(prev, doc)
            prev = doc["hash"]
            ls[i] = canonical_bytes(doc)
        put(seg, ls)
    r = verify([archive], public_keys=KEYS)
    assert r.error is not None and r.error.kind == "bad-checkpoint"
    assert r.error.seq is not None and r.error.seq >= 7


def test_delete_a_record(archive: Path) -> None:
    seg = segs(archive)[2]
    ls = lines(seg)
    i = event_lines(seg)[0]
    gone = json.loads(ls.pop(i))
    put(seg, ls)
    r = verify([archive], public_keys=KEYS)
    assert r.error is not None
    assert (r.error.kind, r.error.segment, r.error.line) == ("deleted", seg.name, i + 1)
    assert r.error.seq == gone["seq"] + 1


def test_insert_a_record(archive: Path) -> None:
    seg = segs(archive)[2]
    ls = lines(seg)
    copy = lines(segs(archive)[0])[0]  # replay an old record
    i = event_lines(seg)[1]
    ls.insert(i, copy)
    put(seg, ls)
    r = verify([archive], public_keys=KEYS)
    assert r.error is not None
    assert (r.error.kind, r.error.segment, r.error.line) == ("inserted", seg.name, i + 1)


def test_swap_two_records(archive: Path) -> None:
    seg = segs(archive)[1]
    ls = lines(seg)
    a, b = event_lines(seg)[:2]
    ls[a], ls[b] = ls[b], ls[a]
    put(seg, ls)
    r = verify([archive], public_keys=KEYS)
    assert r.error is not None
    assert (r.error.kind, r.error.segment, r.error.line) == ("reordered", seg.name, a + 1)


def crashed_before_head(archive: Path) -> None:
    """A crash mid-write of a line: HEAD.json (written after the line is fsync'ed) does not
    cover that line yet. Here the cut line is the newest checkpoint: as the crash would have
    left it, HEAD.json is the one before."""
    (archive / "HEAD.json").unlink()


def test_truncate_the_newest_segment_mid_line_is_a_torn_line(archive: Path) -> None:
    crashed_before_head(archive)
    seg = segs(archive)[-1]
    data = seg.read_bytes()
    ls = lines(seg)
    cut = len(data) - len(ls[-1]) // 2 - 1
    seg.chmod(0o640)
    seg.write_bytes(data[:cut])
    r = verify([archive], public_keys=KEYS)
    assert r.ok and r.exit_code == 3  # reported, and everything before it verifies
    assert r.torn is not None and (r.torn.segment, r.torn.line) == (seg.name, len(ls))
    assert r.records == 30  # the torn line was the sealing checkpoint


def test_truncate_mid_record_keeps_the_records_before(archive: Path) -> None:
    crashed_before_head(archive)
    seg = segs(archive)[-1]
    ls = lines(seg)
    j = event_lines(seg)[-1]
    put(seg, [*ls[:j], ls[j][:40]], tail=b"")
    r = verify([archive], public_keys=KEYS)
    assert r.ok and r.torn is not None and r.torn.line == j + 1
    assert r.records == 29 and r.last_seq == 29


def test_truncate_a_closed_segment(archive: Path) -> None:
    seg = segs(archive)[1]
    ls = lines(seg)
    put(seg, [*ls[:-1], ls[-1][:10]], tail=b"")
    r = verify([archive], public_keys=KEYS)
    assert r.error is not None
    assert (r.error.kind, r.error.segment, r.error.line) == ("truncated", seg.name, len(ls))


def test_cut_a_closed_segment_at_a_line_boundary(archive: Path) -> None:
    seg = segs(archive)[1]
    ls = lines(seg)
    put(seg, ls[:-2])  # drop its last record and its sealing checkpoint
    r = verify([archive], public_keys=KEYS)
    assert r.error is not None and (r.error.kind, r.error.segment) == ("unsealed", seg.name)


def test_remove_a_whole_segment(archive: Path) -> None:
    s = segs(archive)
    s[2].chmod(0o640)
    s[2].unlink()
    r = verify([archive], public_keys=KEYS)
    assert r.error is not None
    assert (r.error.kind, r.error.segment, r.error.line) == ("deleted", s[2].name, 0)
    assert f"the seal of {s[1].name}" in r.error.detail and s[3].name in r.error.detail


def test_remove_the_first_segment(archive: Path) -> None:
    s = segs(archive)
    s[0].chmod(0o640)
    s[0].unlink()
    r = verify([archive], public_keys=KEYS)
    assert r.error is not None and (r.error.kind, r.error.segment) == ("deleted", s[1].name)
    assert verify([archive], public_keys=KEYS, allow_partial_start=True).ok


def test_forged_checkpoint_signature(archive: Path) -> None:
    seg = segs(archive)[1]
    ls = lines(seg)
    i = len(ls) - 1
    doc = json.loads(ls[i])
    assert doc["kind"] == "checkpoint"
    forger = SigningKey(KEY.private_key, KEY.key_id)  # same id, wrong key below
    forged = SigningKey.generate().checkpoint(
        segment=doc["segment"], seq=doc["seq"], hash_=doc["hash"], ts_ms=doc["ts_ms"]
    )
    forged["key_id"] = forger.key_id
    ls[i] = canonical_bytes(forged)
    put(seg, ls)
    r = verify([archive], public_keys=KEYS)
    assert r.error is not None
    assert (r.error.kind, r.error.segment, r.error.line) == ("bad-checkpoint", seg.name, i + 1)
    assert "bad signature" in r.error.detail


def test_tail_cut_is_caught_by_the_archive_head_and_a_published_one(archive: Path) -> None:
    published = json.loads((archive / "HEAD.json").read_text())
    seg = segs(archive)[-1]
    ls = lines(seg)
    put(seg, ls[: event_lines(seg)[-1]])  # drop the last record and its checkpoint
    r = verify([archive], public_keys=KEYS)  # the archive's own HEAD.json
    assert r.error is not None and (r.error.kind, r.error.segment) == ("truncated", seg.name)
    assert "seq 30" in r.error.detail and "ends at seq 29" in r.error.detail
    (archive / "HEAD.json").unlink()  # cut with its HEAD.json: only a published head tells
    assert verify([archive], public_keys=KEYS).ok
    r = verify([archive], public_keys=KEYS, anchor=published)
    assert r.error is not None and r.error.kind == "truncated"


def test_cli_verify_exit_codes(
    archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pub = tmp_path / "k.pub.pem"
    pub.write_bytes(KEY.public_pem())
    assert audit_main(["audit", "verify", str(archive), "--pubkey", str(pub)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(archive, bad)
    seg = segs(bad)[0]
    ls = lines(seg)
    ls[0] = ls[0].replace(b"user0", b"user9")
    put(seg, ls)
    assert audit_main(["audit", "verify", str(bad), "--pubkey", str(pub), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["error"]["kind"] == "modified" and out["error"]["line"] == 1
    assert out["error"]["segment"] == seg.name


_KEYS = st.text(alphabet='abcdefghijklmnopqrstuvwxyz_"\\\x7f\u00e9', min_size=1, max_size=12)
_SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEYS, _SCALARS, max_size=12), st.integers(1, 2**40))
@example({"i\x7f": 1, "a": "x"}, 1)
@example({'i\u00e9"': "\x7f", "hash": "forged"}, 2)
@example({"zz": None}, 3)
def test_chain_line_is_the_canonical_chained_record(record: dict[str, Any], seq: int) -> None:
    """The archive's one-encoding splice writes exactly the canonical bytes of the chained
    record, with the same hash, whatever keys and values a stream entry holds."""
    record = {k: v for k, v in record.items() if k not in ARCHIVE_FIELDS - {"hash"}}
    prev = "ab" * 32
    line, digest = chain_line(record, seq=seq, stream_id="1-0", prev_hash=prev)
    expected = chain_record(
        {k: v for k, v in record.items() if k != "hash"}, seq=seq, stream_id="1-0", prev_hash=prev
    )
    assert digest == expected["hash"]
    assert line == canonical_bytes(expected)
