"""The inputs of a pack besides the archive: the adversarial-suite report and a coverage
result file. Each is read strictly; a file that is not what it claims is refused with the
reason (the pack then is not made), never silently left out."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

_ROW = re.compile(r"^\|(.+)\|\s*$")


class InputError(ValueError):
    """An input file is missing or not in the expected format."""


def _cells(line: str) -> list[str] | None:
    m = _ROW.match(line.strip())
    if m is None:
        return None
    return [c.strip().strip("*").strip("`").strip() for c in m.group(1).split("|")]


def read_security_report(path: Path) -> dict[str, Any]:
    """The summary of ``docs/security-tests.md`` (``make security`` writes it): cases and
    outcomes per category, and every case whose verdict is not "safe"."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    text = raw.decode("utf-8", "replace")
    section = ""
    categories: list[dict[str, Any]] = []
    not_safe: list[dict[str, str]] = []
    verdicts: dict[str, int] = {}
    header: list[str] = []
    for line in text.splitlines():
        if line.startswith("## "):
            section, header = line[3:].strip().lower(), []
            continue
        cells = _cells(line)
        if cells is None or all(set(c) <= set("-: ") for c in cells):
            continue
        if not header:
            header = [c.lower() for c in cells]
            continue
        row = dict(zip(header, cells, strict=False))
        if section == "summary" and "category" in row:
            try:
                cases = int(row.get("cases", ""))
            except ValueError as exc:
                raise InputError(f"{path}: summary row {cells!r}: cases is not a number") from exc
            categories.append(
                {"category": row["category"], "cases": cases, "outcomes": row.get("outcomes", "")}
            )
        elif section == "cases" and "verdict" in row:
            verdict = row["verdict"].lower()
            verdicts[verdict] = verdicts.get(verdict, 0) + 1
            if verdict != "safe":
                not_safe.append(
                    {k: row.get(k, "") for k in ("category", "case", "expected safe outcome")}
                    | {"observed": row.get("observed", ""), "verdict": verdict}
                )
    if not categories:
        raise InputError(f"{path}: no '## Summary' table of categories and cases found")
    total = next((c for c in categories if c["category"].lower() == "all"), None)
    return {
        "path": str(path),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "categories": [c for c in categories if c is not total],
        "total_cases": total["cases"] if total else sum(c["cases"] for c in categories),
        "verdicts": verdicts,
        "not_safe": not_safe,
    }


def read_coverage_result(path: Path) -> dict[str, Any]:
    """A result written by ``stepup-authz coverage --json``."""
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    except ValueError as exc:
        raise InputError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != "stepup-authz-coverage":
        raise InputError(f"{path}: not a `stepup-authz coverage --json` result")
    return doc
