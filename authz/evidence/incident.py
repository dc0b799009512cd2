"""``audit incident``: every recorded decision for one user or one session in a window.

For incident scoping (Reg S-P's 2024 amendments ask a firm to assess whose information was
accessed): route, level, outcome, time, device and IP of each record, from the verified
archive. ``--session`` also brings the user-wide revocations (``session: "*"``) of the
users seen in that session, since they ended it too.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from authz.audit.export import iso_ms

COLUMNS = (
    "time_utc",
    "type",
    "route",
    "level",
    "outcome",
    "reason",
    "factor",
    "device",
    "client_ip",
    "decision_id",
    "session",
    "seq",
)


def select_incident(
    records: Iterable[Mapping[str, Any]],
    *,
    since_ms: int,
    until_ms: int,
    user: str | None = None,
    session: str | None = None,
) -> list[dict[str, Any]]:
    if (user is None) == (session is None):
        raise ValueError("give one of user or session")
    window = [
        dict(r)
        for r in records
        if isinstance(r.get("ts_ms"), int) and since_ms <= r["ts_ms"] < until_ms
    ]
    if user is not None:
        hits = [r for r in window if r.get("user") == user]
    else:
        hits = [r for r in window if r.get("session") == session]
        users = {r.get("user") for r in hits if isinstance(r.get("user"), str)}
        hits += [
            r
            for r in window
            if r.get("session") == "*" and r.get("user") in users and r not in hits
        ]
    hits.sort(key=lambda r: (r["ts_ms"], r.get("seq", 0)))
    return hits


def _row(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {"time_utc": iso_ms(rec["ts_ms"]), **{c: rec.get(c) for c in COLUMNS[1:]}}


def summary(hits: Sequence[Mapping[str, Any]]) -> str:
    if not hits:
        return "0 records"

    def distinct(name: str) -> int:
        return len({r.get(name) for r in hits if r.get(name) is not None})

    return (
        f"{len(hits)} records from {iso_ms(hits[0]['ts_ms'])} to {iso_ms(hits[-1]['ts_ms'])}; "
        f"{distinct('route')} routes, {distinct('session')} sessions, {distinct('device')} "
        f"devices, {distinct('client_ip')} IPs"
    )


def write(hits: Sequence[Mapping[str, Any]], fmt: str, out: TextIO) -> None:
    rows = [_row(r) for r in hits]
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, sort_keys=True) + "\n")
    elif fmt == "csv":
        from authz.audit.export import _cell

        w = csv.writer(out, lineterminator="\r\n")
        w.writerow(COLUMNS)
        for row in rows:
            w.writerow([_cell(row[c]) for c in COLUMNS])
    else:
        shown = ("time_utc", "type", "route", "level", "outcome", "device", "client_ip")
        for row in rows:
            out.write(
                "  ".join(
                    "".join(ch if 0x20 <= ord(ch) < 0x7F else "?" for ch in str(row[c] or "-"))
                    for c in shown
                )
                + "\n"
            )


def _cmd_incident(args: argparse.Namespace) -> int:
    from authz.audit import export as ex
    from authz.audit.chain import load_public_keys

    try:
        since, until = ex.parse_time(args.since), ex.parse_time(args.until)
        keys = load_public_keys(args.pubkey or ())
    except (OSError, ValueError) as exc:
        print(f"audit incident: {exc}", file=sys.stderr)
        return 2
    if until <= since:
        print("audit incident: --until must be after --since", file=sys.stderr)
        return 2
    try:
        records, report = ex.select(args.paths, ex.Filter(), public_keys=keys, force=args.force)
    except OSError as exc:
        print(f"audit incident: {exc}", file=sys.stderr)
        return 2
    except ex.ExportRefused as exc:
        print(
            f"audit incident: refused, the archive does not verify: {exc} (--force to list "
            "from it anyway)",
            file=sys.stderr,
        )
        return 1
    hits = select_incident(
        records, since_ms=since, until_ms=until, user=args.user, session=args.session
    )
    out = sys.stdout if args.output is None else args.output.open("w", newline="")
    try:
        write(hits, args.format, out)
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"audit incident: {summary(hits)}", file=sys.stderr)
    if not report.ok:
        print("audit incident: WARNING: the archive did not verify (--force)", file=sys.stderr)
    return 0


def add_incident_parser(sub: Any) -> None:
    """Register ``audit incident`` on the ``audit`` group's subparsers."""
    i = sub.add_parser(
        "incident", help="every decision for one user or session in a window (verifies first)"
    )
    i.add_argument("paths", nargs="+", type=Path, help="archive directories or segment files")
    who = i.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="iss|sub")
    who.add_argument("--session", help="the session key (40 hex digits, as records hold it)")
    i.add_argument("--since", required=True, help="inclusive; ISO 8601 (UTC if no offset) or ms")
    i.add_argument("--until", required=True, help="exclusive; ISO 8601 or epoch ms")
    i.add_argument("--format", choices=("text", "jsonl", "csv"), default="text")
    i.add_argument("--output", type=Path, help="file (default stdout)")
    i.add_argument("--pubkey", action="append", type=Path, help="Ed25519 public key PEM")
    i.add_argument("--force", action="store_true", help="list even if verify fails")
    i.set_defaults(func=_cmd_incident)
