"""``stepup-authz evidence ...`` (make a pack), ``evidence verify DIR`` and ``coverage``.

Exit codes: ``evidence`` 0 made, 1 refused (the archive does not verify), 2 bad input;
``evidence verify`` 0 intact, 1 changed or not signed by a given key, 2 bad input;
``coverage`` 0 all covered, 1 uncovered or fail-open routes, 2 an Envoy could not be read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


def _fail(cmd: str, msg: str, code: int = EXIT_USAGE) -> int:
    print(f"{cmd}: {msg}", file=sys.stderr)
    return code


def _period(args: argparse.Namespace, now: float) -> tuple[int, int]:
    from authz.audit.export import parse_time

    if args.last is not None:
        if args.since or args.until:
            raise ValueError("give --last or --since/--until, not both")
        end = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return int((end - timedelta(days=args.last)).timestamp() * 1000), int(
            end.timestamp() * 1000
        )
    if not args.since or not args.until:
        raise ValueError(
            "the period is required: --since and --until (ISO 8601, UTC when no offset is "
            "given, or epoch ms; until is exclusive), or --last DAYS"
        )
    out = []
    for flag, text in (("--since", args.since), ("--until", args.until)):
        try:
            out.append(parse_time(text))
        except ValueError:
            raise ValueError(
                f"{flag} {text!r} is not a time (ISO 8601 such as 2026-03-01 or "
                "2026-03-01T09:30:00Z, or epoch ms)"
            ) from None
    return out[0], out[1]


def _deadline(args: argparse.Namespace) -> tuple[int, tuple[str, ...]]:
    """The service's deadline and exempt prefixes: --config settings, else the flags."""
    if args.config is not None:
        from authz.config.settings import load_settings
        from authz.evidence.monitor import exempt_prefixes, service_deadline_ms

        settings = load_settings(args.config)
        return service_deadline_ms(settings), tuple(args.exempt_prefix or ()) or exempt_prefixes(
            settings
        )
    return args.service_deadline_ms, tuple(args.exempt_prefix or ("/_stepup/",))


def _cmd_evidence(args: argparse.Namespace) -> int:
    if args.evidence_command == "verify":
        return _cmd_verify(args)
    from authz.errors import ConfigError
    from authz.evidence.pack import PackError, PackOptions, PackRefused, make_pack

    cmd = "evidence"
    now = time.time()
    try:
        since, until = _period(args, now)
        deadline, exempt = _deadline(args)
    except (ValueError, ConfigError) as exc:
        return _fail(cmd, str(exc))
    if not args.archive:
        return _fail(cmd, "--archive is required (the archive directory or segment files)")
    if args.out is None:
        return _fail(cmd, "--out is required (a new or empty directory for the pack)")
    if args.signing_key is None:
        return _fail(cmd, "--signing-key is required (the checkpoint signing key, PEM)")
    out = Path(
        str(args.out).format(
            since=datetime.fromtimestamp(since / 1000, UTC).strftime("%Y-%m-%d"),
            until=datetime.fromtimestamp(until / 1000, UTC).strftime("%Y-%m-%d"),
        )
    )
    opts = PackOptions(
        archive=args.archive,
        since_ms=since,
        until_ms=until,
        out=out,
        signing_key=args.signing_key,
        pubkeys=args.pubkey or (),
        anchor=args.anchor,
        policies=args.policy or (),
        security_report=args.security_report,
        coverage_result=args.coverage,
        envoy_admin=args.envoy_admin or (),
        deadline_ms=deadline,
        exempt_prefixes=exempt,
        pseudonymise=args.pseudonymise or args.pseudonym_key is not None,
        pseudonym_key=args.pseudonym_key,
        allow_unverified=args.allow_unverified,
        merge_gap_s=args.fail_closed_gap_s,
    )
    try:
        result = make_pack(opts)
    except PackRefused as exc:
        return _fail(cmd, f"refused: {exc}", 1)
    except PackError as exc:
        return _fail(cmd, str(exc))
    except OSError as exc:  # writing the pack: a full disk, a read-only --out
        return _fail(cmd, f"cannot write the pack: {exc}")
    s = result.facts["summary"]
    warn = " -- UNVERIFIED ARCHIVE (--allow-unverified)" if result.facts["unverified"] else ""
    print(
        f"evidence pack {result.out}: {s['records']} records, {s['stepup_challenges']} "
        f"challenges, {s['stepups_succeeded']} step-ups, {s['fail_closed']} fail-closed; "
        f"report.pdf {result.pdf_pages} pages; manifest signed by key {result.manifest['key_id']}"
        f"{warn}"
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from authz.audit.chain import load_public_keys
    from authz.evidence.manifest import verify_pack

    cmd = "evidence verify"
    if not args.verify_pubkey:
        return _fail(cmd, "--pubkey is required (the public key of the checkpoint signing key)")
    try:
        keys = load_public_keys(args.verify_pubkey)
    except (OSError, ValueError) as exc:
        return _fail(cmd, str(exc))
    if not args.dir.is_dir():
        return _fail(cmd, f"{args.dir}: not a directory")
    check = verify_pack(args.dir, keys)
    for f in check.files:
        print(f"{f['name']}: sha256 {f['sha256']} ({f['bytes']} bytes)")
    if check.ok:
        from authz.audit.export import iso_ms

        period = check.manifest.get("period", {})
        since, until = period.get("since_ms"), period.get("until_ms")
        shown = (
            f"{iso_ms(since)} to {iso_ms(until)}"
            if isinstance(since, int) and isinstance(until, int)
            else "unknown"
        )
        print(f"OK: pack signed by key {check.key_id}; period {shown}")
        return 0
    for p in check.problems:
        print(f"FAILED: {p}")
    return 1


def _cmd_coverage(args: argparse.Namespace) -> int:
    from authz.errors import ConfigError
    from authz.evidence.coverage import check_mesh, render_text

    try:
        deadline, exempt = _deadline(args)
    except ConfigError as exc:
        return _fail("coverage", str(exc))
    urls = list(args.envoy_admin or ())
    if not urls and args.config is not None:
        from authz.config.settings import load_settings

        urls = list(load_settings(args.config).coverage.envoy_admin_urls)
    if not urls:
        return _fail("coverage", "--envoy-admin URL is required (or coverage.envoy_admin_urls)")
    report = check_mesh(urls, deadline_ms=deadline, exempt_prefixes=exempt, timeout_s=args.timeout)
    text = json.dumps(report.as_dict(), indent=2) if args.json else render_text(report)
    if args.output is not None:
        try:
            args.output.write_text(text + "\n")
        except OSError as exc:
            return _fail("coverage", f"--output: {exc}")
    else:
        print(text)
    for e in report.errors:
        print(f"coverage: {e['error']}", file=sys.stderr)
    return report.exit_code


def add_evidence_parsers(sub: Any) -> None:
    """Register ``evidence`` (with ``evidence verify``) and ``coverage``."""
    e = sub.add_parser(
        "evidence",
        help="a signed evidence pack for a period: report.html, report.pdf, evidence.json",
        description="Make a pack (the options below), or check one: evidence verify DIR.",
    )
    e.add_argument("--archive", action="append", type=Path, help="archive dir (repeatable)")
    e.add_argument("--since", help="inclusive; ISO 8601 (UTC if no offset) or epoch ms")
    e.add_argument("--until", help="exclusive; ISO 8601 or epoch ms")
    e.add_argument("--last", type=int, help="the last N whole UTC days (ends at today 00:00)")
    e.add_argument("--out", type=Path, help="new or empty dir; {since} {until} are replaced")
    e.add_argument("--signing-key", type=Path, help="the checkpoint signing key (PEM)")
    e.add_argument(
        "--pubkey", action="append", type=Path, help="more public keys (rotated, repeatable)"
    )
    e.add_argument("--anchor", type=Path, help="a saved HEAD.json the archive must reach")
    e.add_argument("--policy", action="append", type=Path, help="policy file (repeatable)")
    e.add_argument("--security-report", type=Path, help="docs/security-tests.md")
    e.add_argument("--coverage", type=Path, help="a `coverage --json` result file")
    e.add_argument("--envoy-admin", nargs="+", help="check these Envoys' coverage now")
    e.add_argument("--config", type=Path, help="service settings (the deadline for coverage)")
    e.add_argument("--service-deadline-ms", type=int, default=150)
    e.add_argument("--exempt-prefix", action="append")
    e.add_argument("--pseudonymise", action="store_true", help="users as HMAC pseudonyms")
    e.add_argument("--pseudonym-key", type=Path, help="key file for stable pseudonyms")
    e.add_argument(
        "--allow-unverified",
        action="store_true",
        help="make a pack from an archive that fails verification (its first page says so)",
    )
    e.add_argument("--fail-closed-gap-s", type=int, default=60)
    e.set_defaults(func=_cmd_evidence, evidence_command=None)
    esub = e.add_subparsers(dest="evidence_command")
    v = esub.add_parser("verify", help="check a pack's files against its signed manifest")
    v.add_argument("dir", type=Path)
    v.add_argument("--pubkey", dest="verify_pubkey", action="append", type=Path)
    v.set_defaults(func=_cmd_evidence)

    c = sub.add_parser(
        "coverage", help="does ext_authz check every route of live Envoys? (/config_dump)"
    )
    c.add_argument("--envoy-admin", nargs="+", help="Envoy admin URLs (http://host:port)")
    c.add_argument("--config", type=Path, help="service settings: deadline, exempt, URLs")
    c.add_argument(
        "--service-deadline-ms",
        type=int,
        default=150,
        help="the service's deadline (redis.deadline_ms + audit.durable_deadline_ms)",
    )
    c.add_argument("--exempt-prefix", action="append", help="default /_stepup/")
    c.add_argument("--timeout", type=float, default=5.0, help="seconds per Envoy")
    c.add_argument("--json", action="store_true")
    c.add_argument("--output", type=Path)
    c.set_defaults(func=_cmd_coverage)
