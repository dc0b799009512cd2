"""stepup-authz command line: serve | policy check | policy explain | demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from authz.errors import ConfigError


def _cmd_serve(args: argparse.Namespace) -> int:
    from authz.app import serve
    from authz.config.settings import load_settings
    from authz.ops.logs import configure_logging

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"stepup-authz: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log.level, settings.log.json_format)
    if args.workers > 1:
        from authz.ops.workers import supervise

        try:
            return supervise(args.config, settings, args.workers)
        except ConfigError as exc:
            print(f"stepup-authz: {exc}", file=sys.stderr)
            return 2
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        runner = asyncio.run
    try:
        runner(serve(settings))
    except ConfigError as exc:
        print(f"stepup-authz: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_policy_check(args: argparse.Namespace) -> int:
    from authz.config.policy_file import read_policy

    try:
        loaded = read_policy(args.file)
    except ConfigError as exc:
        print(f"invalid policy: {exc}", file=sys.stderr)
        return 1
    p = loaded.policy
    print(
        f"ok: {args.file}: {len(p.levels)} levels, {len(p.routes)} routes, "
        f"{len(p.rules)} rules; version {loaded.version}; sha256 {loaded.sha256}"
    )
    return 0


def _cmd_policy_explain(args: argparse.Namespace) -> int:
    from authz.config.policy_file import read_policy
    from authz.explain import explain, render_text

    try:
        loaded = read_policy(args.file)
    except ConfigError as exc:
        print(f"invalid policy: {exc}", file=sys.stderr)
        return 1
    try:
        out = explain(loaded, json.loads(Path(args.request).read_text()))
    except OSError as exc:
        print(f"cannot read the request file: {exc.strerror}", file=sys.stderr)
        return 1
    except ValueError as exc:  # json.JSONDecodeError
        print(f"invalid request file: not JSON: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"invalid request file: {exc.reason}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2) if args.json else render_text(out))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from authz.demo.__main__ import main as demo_main

    return demo_main(args.rest)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stepup-authz", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the ext_authz gRPC service and the HTTP endpoints")
    s.add_argument("--config", required=True, type=Path, help="settings YAML file")
    s.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="service processes sharing the ports (SO_REUSEPORT); default 1",
    )
    s.set_defaults(func=_cmd_serve)

    pol = sub.add_parser("policy", help="check or explain a policy file")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    c = psub.add_parser("check", help="validate a policy file (exit 1 with the error)")
    c.add_argument("file", type=Path)
    c.set_defaults(func=_cmd_policy_check)
    e = psub.add_parser("explain", help="decide one request offline (no token, Redis or IdP)")
    e.add_argument("file", type=Path)
    e.add_argument(
        "--request",
        required=True,
        type=Path,
        help="JSON: method, host, path, headers, source_ip, context_extensions, "
        "claims, grants, device, state, geo, now (see authz/explain.py)",
    )
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=_cmd_policy_explain)

    d = sub.add_parser("demo", help="start the demo: Envoy on :8080, service, Valkey, dev IdP")
    d.add_argument("rest", nargs=argparse.REMAINDER)
    d.set_defaults(func=_cmd_demo)

    # Subcommand groups of their own modules (imported here: `serve` need not load them).
    from authz.admin.cli import add_sessions_parser
    from authz.audit.cli import add_audit_parser
    from authz.evidence.cli import add_evidence_parsers
    from authz.render import add_render_parser
    from authz.stepup.passkeys.cli import add_passkeys_parser

    add_audit_parser(sub)
    add_render_parser(sub)
    add_sessions_parser(sub)
    add_evidence_parsers(sub)
    add_passkeys_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
