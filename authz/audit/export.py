"""Examiner export: the archived records for a window, filtered, sorted, complete.

The archive is verified first (a broken chain means the export could not be complete, so
it is refused unless ``force``); then every event record is read, filtered by
``since <= ts_ms < until``, user and type, and written sorted by (ts_ms, seq) as JSON Lines
(the archived lines, hashes included, byte for byte) or CSV.

CSV is for spreadsheets: control characters are written as ``\\uXXXX`` escapes (never raw),
and a cell that a spreadsheet would run as a formula (starting with = + - @, tab or CR) is
prefixed with a single quote (OWASP "CSV injection"). The JSONL output is the faithful one.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from authz.audit.events import COMMON_FIELDS, canonical_bytes
from authz.audit.segments import list_segments, read_lines
from authz.audit.verify import Head, Report, verify

CSV_COLUMNS: tuple[str, ...] = ("seq", "time_utc", *COMMON_FIELDS, "details", "stream_id", "hash")
_CHAIN = frozenset({"kind", "seq", "stream_id", "prev_hash", "hash", "v"})
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class ExportRefused(Exception):
    def __init__(self, report: Report) -> None:
        self.report = report
        super().__init__(str(report.error))


def parse_time(text: str) -> int:
    """UTC milliseconds from epoch ms digits or ISO 8601 (naive means UTC)."""
    if text.isdigit():
        return int(text)
    dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def iso_ms(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Filter:
    since_ms: int | None = None
    until_ms: int | None = None
    users: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()

    def __call__(self, rec: Mapping[str, Any]) -> bool:
        ts = rec.get("ts_ms")
        if not isinstance(ts, int):
            return self.since_ms is None and self.until_ms is None
        if self.since_ms is not None and ts < self.since_ms:
            return False
        if self.until_ms is not None and ts >= self.until_ms:
            return False
        if self.users and rec.get("user") not in self.users:
            return False
        return not (self.types and rec.get("type") not in self.types)


def read_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every event line of the segments. A line that is not JSON (``--force`` on a broken
    archive) is skipped: verify reported it, and it holds no record."""
    out: list[dict[str, Any]] = []
    for seg in list_segments(list(paths)):
        for ln in read_lines(seg):
            if not ln.complete:
                continue  # a torn last line: verify reports it; it holds no record
            try:
                doc = json.loads(ln.raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                continue
            if isinstance(doc, dict) and doc.get("kind") == "event":
                out.append(doc)
    return out


def select(
    paths: Iterable[Path],
    flt: Filter,
    *,
    public_keys: Mapping[str, Ed25519PublicKey] | None = None,
    heads: Sequence[Head] = (),
    allow_partial_start: bool = False,
    require_sealed: bool = False,
    force: bool = False,
) -> tuple[list[dict[str, Any]], Report]:
    paths = list(paths)
    report = verify(
        paths,
        public_keys=public_keys,
        heads=heads,
        allow_partial_start=allow_partial_start,
        require_sealed=require_sealed,
    )
    if not report.ok and not force:
        raise ExportRefused(report)
    recs = [r for r in read_records(paths) if flt(r)]
    recs.sort(
        key=lambda r: (r.get("ts_ms") if isinstance(r.get("ts_ms"), int) else 0, r.get("seq", 0))
    )
    return recs, report


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value)
    text = _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    return text


def write_jsonl(records: Iterable[Mapping[str, Any]], out: TextIO) -> int:
    n = 0
    for rec in records:
        out.write(canonical_bytes(rec).decode("ascii") + "\n")
        n += 1
    return n


def write_csv(records: Iterable[Mapping[str, Any]], out: TextIO) -> int:
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    n = 0
    for rec in records:
        details = {k: v for k, v in rec.items() if k not in _CHAIN and k not in COMMON_FIELDS}
        ts = rec.get("ts_ms")
        row = [
            rec.get("seq"),
            iso_ms(ts) if isinstance(ts, int) else None,
            *(rec.get(f) for f in COMMON_FIELDS),
            json.dumps(details, sort_keys=True, separators=(",", ":")) if details else None,
            rec.get("stream_id"),
            rec.get("hash"),
        ]
        w.writerow([_cell(v) for v in row])
        n += 1
    return n
