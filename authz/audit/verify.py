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
- a seal (a checkpoint with ``next_segment``) is its segment's last line, and the segment
  it names is the next one in the archive (else **deleted**: the newest segments are gone,
  or **inserted**: a segment that no seal names);
- every head (a signed checkpoint published outside the archive: ``--head FILE``; and the
  archive's own ``HEAD.json``, read before the segments) is in the archive, byte for byte:
  a cut tail, deleted newest segments and a rewritten record are each named at their
  place. An archive ``HEAD.json`` older than a published head is a **rolled-back head**.

Records after the newest checkpoint are chained but not signed: they are reported as the
**unverified tail** (count and place), an error with ``require_sealed`` (an archive at
rest is sealed: its exporter writes a checkpoint at shutdown). A torn last line in the
newest segment (a crash mid-write) is reported as ``torn`` and is not an error: everything
before it is verified. Exit codes: 0 ok, 3 ok up to a torn last line, 1 a broken link.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from authz.audit.chain import GENESIS, checkpoint_signature_ok, record_hash
from authz.audit.events import canonical_bytes
from authz.audit.segments import Line, list_segments, read_lines

HEAD_FILE = "HEAD.json"


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "segment": self.segment,
            "line": self.line,
            "record_id": self.record_id,
            "seq": self.seq,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Head:
    """A signed checkpoint from outside the segments, and where it came from."""

    checkpoint: Mapping[str, Any]
    source: str
    in_archive: bool = False  # the archive's own HEAD.json

    @property
    def seq(self) -> int:
        seq = self.checkpoint.get("seq")
        return seq if isinstance(seq, int) else -1


@dataclass
class Report:
    segments: int = 0
    records: int = 0
    checkpoints: int = 0
    first_seq: int | None = None
    last_seq: int = 0
    last_hash: str = GENESIS
    signed_through: int = 0  # the highest seq covered by a (verified, with keys) checkpoint
    signatures_checked: bool = False
    heads_checked: list[str] = field(default_factory=list)
    error: Problem | None = None
    torn: Problem | None = None
    tail: Problem | None = None  # records after the newest checkpoint (not an error alone)
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
            return None if p is None else p.as_dict()

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
            "heads_checked": self.heads_checked,
            "error": prob(self.error),
            "torn": prob(self.torn),
            "unverified_tail": prob(self.tail),
            "notes": self.notes,
        }


class _Broken(Exception):
    def __init__(self, problem: Problem) -> None:
        self.problem = problem


def verify(
    paths: Iterable[Path],
    *,
    public_keys: Mapping[str, Ed25519PublicKey] | None = None,
    heads: Sequence[Head] = (),
    anchor: Mapping[str, Any] | None = None,
    allow_partial_start: bool = False,
    require_sealed: bool = False,
) -> Report:
    """Verify the segments under ``paths`` against ``heads`` (and ``anchor``, a head given
    as a bare checkpoint) and each directory's own HEAD.json. Raises OSError when a path
    cannot be read and ValueError for an unreadable HEAD.json."""
    paths = list(paths)
    report = Report(signatures_checked=bool(public_keys))
    all_heads = list(heads)
    if anchor is not None:
        all_heads.append(Head(anchor, "anchor"))
    # HEAD.json first: the exporter writes it after the checkpoint it copies, so read in
    # this order a live archive always reaches it.
    for p in paths:
        if p.is_dir() and (p / HEAD_FILE).is_file():
            all_heads.append(Head(load_head(p / HEAD_FILE), str(p / HEAD_FILE), in_archive=True))
    segs = list_segments(paths)
    report.segments = len(segs)
    if not segs:
        report.error = Problem("empty", "", 0, None, None, "no segment files found")
        return report
    v = _Verifier(report, public_keys or {}, allow_partial_start, all_heads)
    try:
        for head in all_heads:
            v.check_head_signature(head)
        for i, path in enumerate(segs):
            v.segment(path, last=i == len(segs) - 1)
        v.finish([s.name for s in segs])
        if require_sealed and report.tail is not None:
            v.fail_with(report.tail, "archive not sealed (--require-sealed): ")
    except _Broken as exc:
        report.error = exc.problem
    if not public_keys:
        report.notes.append("checkpoint signatures NOT checked (no public key given)")
    if not [h for h in all_heads if not h.in_archive]:
        report.notes.append(
            "no published head given (--head): a tail cut together with its HEAD.json "
            "cannot be told from an archive that ends there"
        )
    return report


class _Verifier:
    def __init__(
        self,
        report: Report,
        keys: Mapping[str, Ed25519PublicKey],
        allow_partial: bool,
        heads: Sequence[Head],
    ) -> None:
        self.r = report
        self.keys = keys
        self.allow_partial = allow_partial
        self.heads = list(heads)
        self.heads_seen: set[int] = set()  # indexes into heads found in the archive
        self.expected: int | None = None  # next seq; None before the first record
        self.prev_hash = GENESIS
        self.next_segment: tuple[str, str, int] | None = None  # (name, named by, line)
        self.cp_seq = 0  # the seq covered by the newest checkpoint
        self.last_loc: tuple[str, int] = ("", 0)  # the newest record's segment and line
        self.first_unsealed: tuple[str, int, int] | None = None  # segment, line, seq
        self.newest_cp: Mapping[str, Any] | None = None

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

    def fail_with(self, p: Problem, prefix: str) -> NoReturn:
        raise _Broken(Problem(p.kind, p.segment, p.line, p.record_id, p.seq, prefix + p.detail))

    def check_head_signature(self, head: Head) -> None:
        cp = head.checkpoint
        if self.keys:
            why = checkpoint_signature_ok(cp, self.keys)
            if why:
                self.fail("bad-head", head.source, 0, f"{why} (the head's checkpoint)")

    def segment(self, path: Path, *, last: bool) -> None:
        name = path.name
        if self.next_segment is not None and self.next_segment[0] != name:
            want, by, at = self.next_segment
            if want < name:
                self.fail(
                    "deleted",
                    want,
                    0,
                    f"missing: the seal of {by} (line {at}) names it as the next segment; "
                    f"the next one present is {name}",
                    seq=self.r.last_seq,
                )
            self.fail(
                "inserted",
                name,
                0,
                f"no seal names this segment: the seal of {by} (line {at}) names {want}",
            )
        self.next_segment = None
        lines = list(read_lines(path))
        last_kind: str | None = None
        last_no = 0
        sealed_at = 0
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
            if sealed_at:
                self.fail(
                    "inserted",
                    name,
                    ln.number,
                    f"a line after the seal of this segment (line {sealed_at})",
                )
            doc = self._parse(name, ln)
            last_no = ln.number
            kind = doc.get("kind")
            if kind == "event":
                if seq_lines is None:
                    seq_lines = _seq_index(lines)
                self._event(name, ln.number, doc, seq_lines)
            elif kind == "checkpoint":
                self._checkpoint(name, ln.number, doc)
                nxt = doc.get("next_segment")
                if isinstance(nxt, str):
                    self.next_segment = (nxt, name, ln.number)
                    sealed_at = ln.number
            else:
                self.fail("malformed", name, ln.number, f"unknown line kind {kind!r}")
            last_kind = str(kind)
        if not last and last_kind != "checkpoint" and lines:
            self.fail(
                "unsealed",
                name,
                last_no,
                "a closed segment must end with a checkpoint: its tail was cut or "
                "the segment was not sealed",
                seq=self.r.last_seq,
            )

    def finish(self, names: list[str]) -> None:
        last_seg = names[-1]
        end = f"the archive ends at seq {self.r.last_seq} ({self.last_loc[0]}:{self.last_loc[1]})"
        if self.next_segment is not None:
            want, by, at = self.next_segment
            self.fail(
                "deleted",
                want,
                0,
                f"missing: the seal of {by} (line {at}) names it as the next segment; {end}: "
                "the newest segment(s) were deleted",
                seq=self.r.last_seq,
            )
        for i, head in enumerate(self.heads):
            if i in self.heads_seen:
                continue
            cp = head.checkpoint
            seg = str(cp.get("segment"))
            if head.seq > self.r.last_seq:
                if seg not in names:
                    self.fail(
                        "deleted",
                        seg,
                        0,
                        f"missing: the head {head.source} covers seq {head.seq} in this "
                        f"segment; {end}: the newest segment(s) were deleted",
                        seq=self.r.last_seq,
                    )
                self.fail(
                    "truncated",
                    seg,
                    0,
                    f"the head {head.source} covers seq {head.seq} in this segment; {end}: "
                    "records were cut off the end",
                    seq=self.r.last_seq,
                )
            self.fail(
                "head-mismatch",
                seg,
                0,
                f"the head {head.source} (seq {head.seq}) is not a checkpoint of this "
                "archive: the checkpoint or the records before it were rewritten",
                seq=head.seq,
            )
        self.r.heads_checked = [h.source for h in self.heads]
        own = [h for h in self.heads if h.in_archive]
        published = [h for h in self.heads if not h.in_archive]
        for h in own:
            newer = [p for p in published if p.seq > h.seq]
            if newer:
                self.fail(
                    "head-rolled-back",
                    h.source,
                    0,
                    f"covers seq {h.seq}, older than the published head {newer[0].source} "
                    f"(seq {newer[0].seq}): HEAD.json was rolled back",
                    seq=h.seq,
                )
            if self.newest_cp is not None and h.seq < int(self.newest_cp.get("seq", 0)):
                self.r.notes.append(
                    f"{h.source} covers seq {h.seq}, behind the newest checkpoint "
                    f"(seq {self.newest_cp.get('seq')}): a crash between the two writes, or "
                    "it was rolled back"
                )
        if self.first_unsealed is not None and self.r.last_seq > self.cp_seq:
            seg, line, seq = self.first_unsealed
            n = self.r.last_seq - self.cp_seq
            self.r.tail = Problem(
                "unverified-tail",
                seg,
                line,
                None,
                seq,
                f"{n} record(s) after the newest checkpoint (seq {seq}..{self.r.last_seq}, "
                f"to {last_seg}:{self.last_loc[1]}) are chained but not signed",
            )

    def _parse(self, name: str, ln: Line) -> dict[str, Any]:
        if any(c < 0x20 or c > 0x7E for c in ln.raw):
            self.fail("malformed", name, ln.number, "raw control or non-ASCII byte")
        try:
            doc = json.loads(ln.raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            self.fail("malformed", name, ln.number, "not valid JSON")
        if not isinstance(doc, dict):
            self.fail("malformed", name, ln.number, "not a JSON object")
        out: dict[str, Any] = doc
        return out

    def _event(self, name: str, no: int, doc: dict[str, Any], seq_lines: Mapping[int, int]) -> None:
        rid = doc.get("event_id") if isinstance(doc.get("event_id"), str) else None
        seq, prev, h = doc.get("seq"), doc.get("prev_hash"), doc.get("hash")
        if not (
            isinstance(seq, int)
            and not isinstance(seq, bool)
            and isinstance(prev, str)
            and isinstance(h, str)
        ):
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
            self.cp_seq = seq - 1
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
        for head in self.heads:
            if head.seq == seq and head.checkpoint.get("hash") != h:
                self.fail(
                    "anchor-mismatch",
                    name,
                    no,
                    f"this record's hash differs from the one the head {head.source} signed:"
                    " the record (or one before it) was rewritten",
                    rid=rid,
                    seq=seq,
                )
        if self.first_unsealed is None:
            self.first_unsealed = (name, no, seq)
        self.prev_hash = str(h)
        self.expected = seq + 1
        self.r.records += 1
        self.r.last_seq = seq
        self.r.last_hash = str(h)
        self.last_loc = (name, no)

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
        self.cp_seq = self.r.last_seq
        self.first_unsealed = None
        self.newest_cp = doc
        raw = canonical_bytes(doc)
        for i, head in enumerate(self.heads):
            if canonical_bytes(head.checkpoint) == raw:
                self.heads_seen.add(i)
        self.r.checkpoints += 1


def _seq_index(lines: list[Line]) -> dict[int, int]:
    """seq -> line number for a segment's events (for telling reordered from deleted)."""
    out: dict[int, int] = {}
    for ln in lines:
        if not ln.complete or b'"kind":"event"' not in ln.raw:
            continue
        try:
            doc = json.loads(ln.raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("seq"), int):
            out.setdefault(doc["seq"], ln.number)
    return out


def load_head(path: Path) -> dict[str, Any]:
    """A head: a signed checkpoint, as HEAD.json holds it, as ``audit head`` prints it, or
    as the exporter's ``audit head`` log line carries it (its ``head`` field). Raises
    ValueError (with the file name) for anything else, OSError when it cannot be read."""
    text = path.read_bytes()
    try:
        doc: Any = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError(f"{path}: not JSON") from None
    if isinstance(doc, dict) and isinstance(doc.get("head"), str):  # a log line
        try:
            doc = json.loads(doc["head"])
        except ValueError:
            raise ValueError(f"{path}: the log line's head is not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") != "checkpoint":
        raise ValueError(f"{path}: not a checkpoint (a head is a signed checkpoint)")
    for name, typ in (("seq", int), ("hash", str), ("segment", str), ("sig", str)):
        if not isinstance(doc.get(name), typ):
            raise ValueError(f"{path}: the checkpoint has no valid {name!r}")
    out: dict[str, Any] = doc
    return out


load_anchor = load_head  # the older name
