"""Segment files: naming, listing, and reading lines with their numbers.

A segment is ``audit-<first seq, 16 digits>-<UTC creation, YYYYmmddTHHMMSSZ>.jsonl``: names
sort in archive order, and the creation time drives age-based rotation across restarts.
"""

from __future__ import annotations

import calendar
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SEGMENT_GLOB = "audit-*.jsonl"
_NAME = re.compile(r"audit-(\d{16})-(\d{8}T\d{6}Z)\.jsonl")


def segment_name(first_seq: int, created_s: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(created_s))
    return f"audit-{first_seq:016d}-{stamp}.jsonl"


def segment_created(path: Path) -> float | None:
    m = _NAME.fullmatch(path.name)
    if m is None:
        return None
    return float(calendar.timegm(time.strptime(m.group(2), "%Y%m%dT%H%M%SZ")))


def list_segments(paths: Iterable[Path]) -> list[Path]:
    """Files as given, directories expanded to their segments; sorted by name."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(p.glob(SEGMENT_GLOB)))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return sorted(set(out), key=lambda q: (q.name, str(q)))


@dataclass(frozen=True, slots=True)
class Line:
    number: int  # 1-based
    raw: bytes  # without the trailing newline
    complete: bool  # False only for a last line with no newline (torn)


def read_lines(path: Path) -> Iterator[Line]:
    data = path.read_bytes()
    parts = data.split(b"\n")
    last = parts.pop()  # b"" when the file ends with a newline
    for i, raw in enumerate(parts, start=1):
        yield Line(i, raw, True)
    if last:
        yield Line(len(parts) + 1, last, False)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
