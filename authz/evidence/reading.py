"""Reading a whole archive for a pack: the verify report first, then every line by kind.

The archive's own ``verify`` decides integrity; this module only sorts what is there. Lines
are read generically: an event of a type this release does not know, or a line of a kind
other than ``event`` and ``checkpoint`` (a gap or quarantine marker from a newer exporter),
is kept as data to show, never dropped and never an error here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from authz.audit.segments import list_segments, read_lines
from authz.audit.verify import Report, verify


@dataclass(frozen=True)
class ArchiveView:
    report: Report
    segments: tuple[str, ...]
    records: tuple[dict[str, Any], ...]  # kind "event", in archive order
    checkpoints: tuple[dict[str, Any], ...]
    others: tuple[dict[str, Any], ...]  # any other kind, in archive order
    unreadable: int  # complete lines that are not a JSON object (verify names the first)


def read_archive(
    paths: Iterable[Path],
    *,
    public_keys: Mapping[str, Ed25519PublicKey] | None = None,
    anchor: Mapping[str, Any] | None = None,
) -> ArchiveView:
    """Verify, then read every complete line. Raises OSError for a missing path."""
    paths = list(paths)
    report = verify(paths, public_keys=public_keys, anchor=anchor)
    segs = list_segments(paths)
    records: list[dict[str, Any]] = []
    checkpoints: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    unreadable = 0
    for seg in segs:
        for ln in read_lines(seg):
            if not ln.complete:
                continue  # a torn last line holds no record (verify reports it)
            try:
                doc = json.loads(ln.raw)
            except ValueError:
                unreadable += 1
                continue
            if not isinstance(doc, dict):
                unreadable += 1
                continue
            kind = doc.get("kind")
            if kind == "event":
                records.append(doc)
            elif kind == "checkpoint":
                checkpoints.append(doc)
            else:
                others.append({**doc, "_segment": seg.name, "_line": ln.number})
    return ArchiveView(
        report=report,
        segments=tuple(s.name for s in segs),
        records=tuple(records),
        checkpoints=tuple(checkpoints),
        others=tuple(others),
        unreadable=unreadable,
    )
