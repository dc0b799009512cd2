"""``verify(paths) -> Report``: check a whole archive and name the first broken link.

Checked, in archive order (segments sorted by name; each segment line by line):

- every line is complete, canonical-looking JSON of a known ``kind``;
- each event's ``hash`` recomputes (else **modified**), its ``seq`` is the next one (a
  jump is **deleted**, or **reordered** when the missing seq appears later in the segment; a
  repeat or step back is **inserted**), and its ``prev_hash`` is the previous record's hash
  (else **chain-broken**), across segment boundaries too;
- the archive starts at seq 1 from the genesis hash (unless ``allow_partial_start``);
- each checkpoint names its own segment, covers the record just before it, and carries a
  valid Ed25519 signature by a known key (when keys are given);
- every segment but the newest ends with a checkpoint (else **unsealed**: its tail was cut);
- with an ``anchor`` (a saved HEAD.json checkpoint), the archive reaches its seq and hash.

A torn last line in the newest segment (a crash mid-write) is reported as ``torn`` and is
not an error: everything before it is verified. Exit codes: 0 ok, 3 ok up to a torn last
line, 1 a broken link.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from authz.audit.chain import GENESIS, checkpoint_signature_ok, record_hash
from authz.audit.segments import Line, list_segments, read_lines


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str
    segment: str
    line: int
    record_id: str | None
    seq: int | None
    detail: str

    def __str__(self) -> str:
        rid = f" record {self.record_id}" if self.record_id else ""
        seq = f" seq {self.seq}" if self.seq is not None else ""
        return f"{self.kind}: {self.segment}:{self.line}{seq}{rid}: {self.detail}"


@dataclass
class Report:
    segments: int = 0
    records: int = 0
    checkpoints: int = 0
    first_seq: int | None = None
    last_seq: int = 0
    last_hash: str = GENESIS
    signed_through: int = 0  # the highest seq covered by a verified checkpoint
    signatures_checked: bool = False
    error: Problem | None = None
    torn: Problem | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def unsigned_tail(self) -> int:
        return self.last_seq - self.signed_through

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return 1
        return 3 if self.torn is not None else 0

    def as_dict(self) -> dict[str, Any]:
        def prob(p: Problem | None) -> dict[str, Any] | None:
            return (
                None
                if p is None
                else {
                    "kind": p.kind,
                    "segment": p.segment,
                    "line": p.line,
                    "record_id": p.record_id,
                    "seq": p.seq,
                    "detail": p.detail,
                }
            )

        return {
            "ok": self.ok,
            "segments": self.segments,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
            "signed_through": self.signed_through,
            "unsigned_tail": self.unsigned_tail,
            "signatures_checked": self.signatures_checked,
            "error": prob(self.error),
            "torn": prob(self.torn),
            "notes": self.notes,
        }


class _Broken(Exception):
    def __init__(self, problem: Problem) -> None:
        self.problem = problem


def verify(
    paths: Iterable[Path],
    *,
    public_keys: Mapping[str, Ed25519PublicKey] | None = None,
    anchor: Mapping[str, Any] | None = None,
    allow_partial_start: bool = False,
) -> Report:
    report = Report(signatures_checked=bool(public_keys))
    segs = list_segments(list(paths))
    report.segments = len(segs)
    if not segs:
        report.error = Problem("empty", "", 0, None, None, "no segment files found")
        return report
    v = _Verifier(report, public_keys or {}, allow_partial_start)
    try:
        if anchor is not None:
            v.check_anchor_signature(anchor)
        for i, path in enumerate(segs):
            v.segment(path, last=i == len(segs) - 1)
        if anchor is not None:
            v.check_anchor_reached(anchor, segs[-1].name)
    except _Broken as exc:
        report.error = exc.problem
    if not public_keys:
        report.notes.append("checkpoint signatures NOT checked (no public key given)")
    return report


class _Verifier:
    def __init__(
        self, report: Report, keys: Mapping[str, Ed25519PublicKey], allow_partial: bool
    ) -> None:
        self.r = report
        self.keys = keys
        self.allow_partial = allow_partial
        self.expected: int | None = None  # next seq; None before the first record
        self.prev_hash = GENESIS
        self.anchor_seen = False
        self.anchor: Mapping[str, Any] | None = None

    def fail(
        self,
        kind: str,
        seg: str,
        line: int,
        detail: str,
        *,
        rid: str | None = None,
        seq: int | None = None,
    ) -> NoReturn:
        raise _Broken(Problem(kind, seg, line, rid, seq, detail))

    def check_anchor_signature(self, anchor: Mapping[str, Any]) -> None:
        self.anchor = anchor
        if self.keys:
            why = checkpoint_signature_ok(anchor, self.keys)
            if why:
                self.fail("bad-anchor", str(anchor.get("segment", "")), 0, why)

    def check_anchor_reached(self, anchor: Mapping[str, Any], last_seg: str) -> None:
        if not self.anchor_seen:
            self.fail(
                "truncated",
                last_seg,
                0,
                f"the archive ends at seq {self.r.last_seq} but the anchor checkpoint "
                f"covers seq {anchor.get('seq')}: records were cut off the end",
                seq=self.r.last_seq,
            )

    def segment(self, path: Path, *, last: bool) -> None:
        name = path.name
        lines = list(read_lines(path))
        last_kind: str | None = None
        last_no = 0
        seq_lines: dict[int, int] | None = None
        for ln in lines:
            if not ln.complete:
                problem = Problem(
                    "torn",
                    name,
                    ln.number,
                    None,
                    None,
                    f"incomplete last line ({len(ln.raw)} bytes, no newline)",
                )
                if last:
                    self.r.torn = problem
                    break
                self.fail("truncated", name, ln.number, "incomplete line in a closed segment")
            doc = self._parse(name, ln)
            last_no = ln.number
            kind = doc.get("kind")
            if kind == "event":
                if seq_lines is None:
                    seq_lines = _seq_index(lines)
                self._event(name, ln.number, doc, seq_lines)
            elif kind == "checkpoint":
                self._checkpoint(name, ln.number, doc)
            else:
                self.fail("malformed", name, ln.number, f"unknown line kind {kind!r}")
            last_kind = str(kind)
        if not last and last_kind != "checkpoint":
            self.fail(
                "unsealed",
                name,
                last_no,
                "a closed segment must end with a checkpoint: its tail was cut or "
                "the segment was not sealed",
                seq=self.r.last_seq,
            )

    def _parse(self, name: str, ln: Line) -> dict[str, Any]:
        try:
            doc = json.loads(ln.raw)
        except (ValueError, UnicodeDecodeError):
            self.fail("malformed", name, ln.number, "not valid JSON")
        if not isinstance(doc, dict):
            self.fail("malformed", name, ln.number, "not a JSON object")
        if any(c < 0x20 or c > 0x7E for c in ln.raw):
            self.fail("malformed", name, ln.number, "raw control or non-ASCII byte")
        out: dict[str, Any] = doc
        return out

    def _event(self, name: str, no: int, doc: dict[str, Any], seq_lines: Mapping[int, int]) -> None:
        rid = doc.get("event_id") if isinstance(doc.get("event_id"), str) else None
        seq, prev, h = doc.get("seq"), doc.get("prev_hash"), doc.get("hash")
        if not (isinstance(seq, int) and isinstance(prev, str) and isinstance(h, str)):
            self.fail("malformed", name, no, "missing seq/prev_hash/hash", rid=rid)
        if self.expected is None:  # the first record of the archive
            if not self.allow_partial and (seq != 1 or prev != GENESIS):
                self.fail(
                    "deleted",
                    name,
                    no,
                    f"the archive starts at seq {seq}, not at seq 1 from the genesis "
                    "hash: earlier records or segments are missing",
                    rid=rid,
                    seq=seq,
                )
            self.r.first_seq = seq
            self.expected = seq
            self.prev_hash = prev
        if seq != self.expected:
            exp = self.expected
            if seq > exp:
                later = seq_lines.get(exp)
                if later is not None and later > no:
                    self.fail(
                        "reordered",
                        name,
                        no,
                        f"seq {seq} where {exp} was expected; seq {exp} is at line {later}",
                        rid=rid,
                        seq=seq,
                    )
                self.fail(
                    "deleted",
                    name,
                    no,
                    f"seq {seq} where {exp} was expected: {seq - exp} record(s) "
                    "missing before this one",
                    rid=rid,
                    seq=seq,
                )
            self.fail(
                "inserted",
                name,
                no,
                f"seq {seq} where {exp} was expected: a repeated or added record",
                rid=rid,
                seq=seq,
            )
        if record_hash(prev, doc) != h:
            self.fail(
                "modified",
                name,
                no,
                "the record's content does not match its hash",
                rid=rid,
                seq=seq,
            )
        if prev != self.prev_hash:
            self.fail(
                "chain-broken",
                name,
                no,
                "prev_hash is not the previous record's hash (the previous record was "
                "replaced, or this one was)",
                rid=rid,
                seq=seq,
            )
        if self.anchor is not None and seq == self.anchor.get("seq"):
            if h != self.anchor.get("hash"):
                self.fail(
                    "anchor-mismatch",
                    name,
                    no,
                    "this record's hash differs from the anchor checkpoint's",
                    rid=rid,
                    seq=seq,
                )
            self.anchor_seen = True
        self.prev_hash = str(h)
        self.expected = seq + 1
        self.r.records += 1
        self.r.last_seq = seq
        self.r.last_hash = str(h)

    def _checkpoint(self, name: str, no: int, doc: dict[str, Any]) -> None:
        if doc.get("segment") != name:
            self.fail(
                "bad-checkpoint",
                name,
                no,
                f"checkpoint names segment {doc.get('segment')!r} (moved or renamed?)",
            )
        if doc.get("seq") != self.r.last_seq or doc.get("hash") != self.r.last_hash:
            self.fail(
                "bad-checkpoint",
                name,
                no,
                f"checkpoint covers seq {doc.get('seq')} / {str(doc.get('hash'))[:12]}, "
                f"but the chain is at seq {self.r.last_seq} / {self.r.last_hash[:12]}",
                seq=self.r.last_seq,
            )
        if self.keys:
            why = checkpoint_signature_ok(doc, self.keys)
            if why:
                self.fail("bad-checkpoint", name, no, why, seq=self.r.last_seq)
            self.r.signed_through = self.r.last_seq
        self.r.checkpoints += 1


def _seq_index(lines: list[Line]) -> dict[int, int]:
    """seq -> line number for a segment's events (for telling reordered from deleted)."""
    out: dict[int, int] = {}
    for ln in lines:
        if not ln.complete or b'"kind":"event"' not in ln.raw:
            continue
        try:
            doc = json.loads(ln.raw)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("seq"), int):
            out.setdefault(doc["seq"], ln.number)
    return out


def load_anchor(path: Path) -> dict[str, Any]:
    doc: Any = json.loads(path.read_text())
    if not isinstance(doc, dict) or doc.get("kind") != "checkpoint":
        raise ValueError(f"{path}: not a checkpoint")
    out: dict[str, Any] = doc
    return out
