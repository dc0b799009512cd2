"""``stepup-authz audit ...``: verify | export | tail | exporter | keygen.

``add_audit_parser(subparsers)`` registers the group on the main CLI; ``python -m
authz.audit`` (or ``python -m authz.audit.cli``) runs it standalone, e.g. for the exporter
process or on an examiner's machine with only the archive.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from authz.errors import ConfigError

EXIT_USAGE = 2


def _keys(args: argparse.Namespace) -> dict[str, Any]:
    from authz.audit.chain import load_public_keys

    try:
        return load_public_keys(args.pubkey or ())
    except ValueError:  # cryptography's own wording names neither the file nor the fix
        files = ", ".join(str(p) for p in args.pubkey or ())
        raise ValueError(
            f"--pubkey {files}: not an Ed25519 public key PEM "
            "(the .pub.pem that `audit keygen` wrote)"
        ) from None


def _time(option: str, text: str | None) -> int | None:
    from authz.audit import export as ex

    if not text:
        return None
    try:
        return ex.parse_time(text)
    except ValueError:
        raise ValueError(
            f"{option} {text!r}: expected ISO 8601 (2026-03-01, 2026-03-01T12:00Z) or epoch ms"
        ) from None


def _heads(args: argparse.Namespace) -> list[Any]:
    from authz.audit.verify import Head, load_head

    files = [*(args.head or ()), *([args.anchor] if getattr(args, "anchor", None) else [])]
    return [Head(load_head(f), str(f)) for f in files]


def _verify_args(args: argparse.Namespace) -> dict[str, Any]:
    """verify()'s options from the command line; ValueError/OSError for bad input files."""
    if args.require_sealed and not args.pubkey:
        raise ValueError("--require-sealed needs --pubkey: an unsigned checkpoint proves nothing")
    return {
        "public_keys": _keys(args),
        "heads": _heads(args),
        "allow_partial_start": args.allow_partial_start,
        "require_sealed": args.require_sealed,
    }


def _cmd_verify(args: argparse.Namespace) -> int:
    from authz.audit.verify import verify

    try:
        report = verify(args.paths, **_verify_args(args))
    except (OSError, ValueError) as exc:
        print(f"audit verify: {_why(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return report.exit_code
    print(
        f"segments {report.segments}, records {report.records}, checkpoints "
        f"{report.checkpoints}, last seq {report.last_seq}, signed through seq "
        f"{report.signed_through}"
    )
    for head in report.heads_checked:
        print(f"head checked: {head}")
    for note in report.notes:
        print(f"note: {note}")
    if report.tail is not None:
        print(f"UNVERIFIED TAIL: {report.tail}")
    if report.torn is not None:
        print(f"TORN LAST LINE (crash mid-write; everything before it verifies): {report.torn}")
    if report.error is not None:
        print(f"FAILED: first broken link: {report.error}")
    elif report.torn is None:
        print("OK")
    return report.exit_code


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def _cmd_export(args: argparse.Namespace) -> int:
    from authz.audit import export as ex

    try:
        flt = ex.Filter(
            since_ms=_time("--since", args.since),
            until_ms=_time("--until", args.until),
            users=frozenset(args.user or ()),
            types=frozenset(t for v in args.type or () for t in v.split(",") if t),
        )
        options = _verify_args(args)
    except (OSError, ValueError) as exc:
        print(f"audit export: {_why(exc)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        records, report = ex.select(args.paths, flt, force=args.force, **options)
    except (OSError, ValueError) as exc:
        print(f"audit export: {_why(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ex.ExportRefused as exc:
        print(f"audit export: refused, the archive does not verify: {exc}", file=sys.stderr)
        return 1
    try:
        out = sys.stdout if args.output is None else args.output.open("w", newline="")
    except OSError as exc:
        print(f"audit export: {_why(exc)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        write = ex.write_csv if args.format == "csv" else ex.write_jsonl
        n = write(records, out)
    finally:
        if out is not sys.stdout:
            out.close()
    print(
        f"audit export: {n} record(s); archive last seq {report.last_seq}"
        + ("; TORN last line" if report.torn else "")
        + (f"; UNVERIFIED TAIL of {report.unsigned_tail} record(s)" if report.tail else "")
        + (f"; {report.error}" if report.error else ""),
        file=sys.stderr,
    )
    return 0


def _cmd_head(args: argparse.Namespace) -> int:
    """The newest signed head the exporter published to ``<stream>:head``."""
    import redis

    from authz.audit.exporter import HEAD_STREAM_SUFFIX

    client = redis.Redis.from_url(
        args.redis_url or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379",
        socket_timeout=5,
        socket_connect_timeout=5,
    )
    try:
        newest: Any = client.xrevrange(args.stream + HEAD_STREAM_SUFFIX, count=1)
    except redis.RedisError as exc:
        print(f"audit head: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if not newest:
        print(
            f"audit head: nothing published to {args.stream}{HEAD_STREAM_SUFFIX}", file=sys.stderr
        )
        return 1
    cp = newest[0][1].get(b"cp")
    if cp is None:
        print("audit head: the newest entry holds no checkpoint", file=sys.stderr)
        return 1
    text = cp.decode("ascii", "replace") + "\n"
    if args.output is not None:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_tail(args: argparse.Namespace) -> int:
    if args.path is not None:
        try:
            return _tail_archive(args.path, args.lines, args.follow)
        except OSError as exc:
            reason = f"{args.path}: {exc.strerror}" if exc.strerror else str(exc)
            print(f"audit tail: {reason}", file=sys.stderr)
            return EXIT_USAGE
    import redis

    url = args.redis_url or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379"
    try:
        return _tail_stream(args, url)
    except redis.RedisError as exc:
        print(
            f"audit tail: cannot read the stream {args.stream} at {url}: {exc}\n"
            "  give the service's Redis with --redis-url (or REDIS_URL), or an archive directory",
            file=sys.stderr,
        )
        return 1


def _tail_stream(args: argparse.Namespace, url: str) -> int:
    import redis

    from authz.audit.events import canonical_bytes
    from authz.audit.exporter import entry_record

    client = redis.Redis.from_url(url)
    try:
        last = "0-0"
        recent: Any = client.xrevrange(args.stream, count=args.lines)
        for sid, fields in reversed(recent):
            last = sid.decode()
            print(canonical_bytes(entry_record(last, fields)).decode(), flush=True)
        if not recent:
            last = "$"
        while args.follow:
            resp: Any = client.xread({args.stream: last}, block=1000, count=500)
            for _key, items in resp or ():
                for sid, fields in items:
                    last = sid.decode()
                    print(canonical_bytes(entry_record(last, fields)).decode(), flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()
    return 0


def _tail_archive(path: Path, n: int, follow: bool) -> int:
    from authz.audit.segments import list_segments

    segs = list_segments([path])
    if not segs:
        print(f"audit tail: no segments in {path}", file=sys.stderr)
        return 1
    current = segs[-1]
    data = current.read_bytes()
    lines = data.split(b"\n")
    for raw in lines[:-1][-n:] if n else []:
        print(raw.decode("ascii", "replace"), flush=True)
    pos = len(data) - len(lines[-1])  # hold back a partial last line
    try:
        while follow:
            time.sleep(0.5)
            data = current.read_bytes()
            if len(data) > pos:
                chunk = data[pos:]
                done = chunk[: chunk.rfind(b"\n") + 1]
                for raw in done.split(b"\n")[:-1]:
                    print(raw.decode("ascii", "replace"), flush=True)
                pos += len(done)
            newer = [s for s in list_segments([path]) if s.name > current.name]
            if newer and len(data) == pos:
                current, pos = newer[0], 0
    except KeyboardInterrupt:
        return 0
    return 0


def _cmd_exporter(args: argparse.Namespace) -> int:
    from authz.audit.archive import ArchiveError
    from authz.audit.config import load_exporter_settings
    from authz.audit.exporter import run_exporter
    from authz.ops.logs import configure_logging

    configure_logging("INFO", True)
    try:
        settings = load_exporter_settings(args.config)
    except ConfigError as exc:
        print(f"audit exporter: invalid settings: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run_exporter(settings)
    except ConfigError as exc:
        print(f"audit exporter: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ArchiveError as exc:
        print(f"audit exporter: {exc}", file=sys.stderr)
        return 1


def _cmd_keygen(args: argparse.Namespace) -> int:
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(
            f"audit keygen: cannot write into {args.out}: {exc.strerror}; choose another --out",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.mac:
        from authz.audit.mac import KID_RE
        from authz.audit.testing import write_mac_key

        if not KID_RE.fullmatch(args.mac):
            print(f"audit keygen: a key id must match {KID_RE.pattern}", file=sys.stderr)
            return EXIT_USAGE
        path = args.out / f"audit-mac-{args.mac}.key"
        try:
            write_mac_key(path)
        except FileExistsError:
            print(f"audit keygen: {path} exists", file=sys.stderr)
            return 1
        print(
            f"MAC key id {args.mac}: {path} (secret: the services' audit.mac_keys and the "
            "exporter's mac_keys, from one Secret; never in Redis)"
        )
        return 0
    from authz.audit.chain import SigningKey

    key = SigningKey.generate()
    priv = args.out / f"audit-signing-{key.key_id}.pem"
    pub = args.out / f"audit-signing-{key.key_id}.pub.pem"
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_pem())
        pub.write_bytes(key.public_pem())
    except OSError as exc:
        print(
            f"audit keygen: cannot write into {args.out}: {exc.strerror}; choose another --out",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(
        f"key id {key.key_id}\nprivate {priv} (keep secret; exporter signing_key_file)\n"
        f"public  {pub} (give to verifiers: audit verify --pubkey)"
    )
    return 0


def _add_verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pubkey",
        action="append",
        type=Path,
        help="Ed25519 public key PEM (repeat for rotated keys)",
    )
    p.add_argument(
        "--head",
        action="append",
        type=Path,
        help="a signed head published outside the archive (`audit head`, the exporter's "
        "head_file or its log line); the archive must hold it (repeatable)",
    )
    p.add_argument("--anchor", type=Path, help=argparse.SUPPRESS)  # the older --head
    p.add_argument(
        "--require-sealed",
        action="store_true",
        help="fail on records after the newest checkpoint (an archive at rest is sealed)",
    )
    p.add_argument(
        "--allow-partial-start",
        action="store_true",
        help="accept an archive whose oldest segments were retired",
    )


def add_audit_parser(subparsers: Any) -> None:
    """Register ``audit`` and its subcommands on an argparse subparsers object."""
    a = subparsers.add_parser("audit", help="audit trail: verify, export, tail, exporter")
    sub = a.add_subparsers(dest="audit_command", required=True)

    v = sub.add_parser(
        "verify", help="verify an archive; exit 0 ok, 3 torn last line, 1 broken link, 2 usage"
    )
    v.add_argument("paths", nargs="+", type=Path, help="archive directories or segment files")
    _add_verify_options(v)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_cmd_verify)

    e = sub.add_parser("export", help="records for a window, sorted (verifies first)")
    e.add_argument("paths", nargs="+", type=Path)
    e.add_argument("--since", help="inclusive; ISO 8601 (UTC if no offset) or epoch ms")
    e.add_argument("--until", help="exclusive; ISO 8601 or epoch ms")
    e.add_argument("--user", action="append", help="iss|sub (repeatable)")
    e.add_argument("--type", action="append", help="event type (repeatable, or comma list)")
    e.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    e.add_argument("--output", type=Path, help="file (default stdout)")
    _add_verify_options(e)
    e.add_argument("--force", action="store_true", help="export even if verify fails")
    e.set_defaults(func=_cmd_export)

    h = sub.add_parser("head", help="the newest signed head the exporter published (Redis)")
    h.add_argument("--redis-url", help="default $REDIS_URL or redis://127.0.0.1:6379")
    h.add_argument("--stream", default="stepup:audit", help="the audit stream key")
    h.add_argument("--output", type=Path, help="file (default stdout)")
    h.set_defaults(func=_cmd_head)

    t = sub.add_parser("tail", help="follow the stream, or the newest archive segment")
    t.add_argument("path", nargs="?", type=Path, help="archive directory (else the stream)")
    t.add_argument("--redis-url", help="default $REDIS_URL or redis://127.0.0.1:6379")
    t.add_argument("--stream", default="stepup:audit")
    t.add_argument("-n", "--lines", type=int, default=10)
    t.add_argument("--no-follow", dest="follow", action="store_false")
    t.set_defaults(func=_cmd_tail)

    x = sub.add_parser("exporter", help="run the stream -> archive exporter")
    x.add_argument("--config", required=True, type=Path, help="exporter YAML file")
    x.set_defaults(func=_cmd_exporter)

    k = sub.add_parser(
        "keygen", help="generate an Ed25519 checkpoint signing key pair, or (--mac KID) a MAC key"
    )
    k.add_argument("--out", required=True, type=Path)
    k.add_argument("--mac", metavar="KID", help="a producers' MAC key with this key id instead")
    k.set_defaults(func=_cmd_keygen)

    from authz.evidence.incident import add_incident_parser

    add_incident_parser(sub)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stepup-authz")
    add_audit_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
