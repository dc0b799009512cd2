"""stepup-authz command line: serve | policy check | policy explain | render | audit |
sessions | demo.

Exit status: 0 success; 1 the command ran and what it checked failed (an invalid policy
under ``policy check``, a broken audit archive, a refused API call, a dependency that could
not be reached); 2 it could not run as asked (usage, settings or input files); 130
interrupted. A failure is one or two lines on stderr naming what failed and what to do,
never a traceback (``STEPUP_TRACEBACK=1`` shows one, for a bug report).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from authz import version
from authz.errors import ConfigError, KeysUnavailable, OidcError, RequestError, StoreError

PROG = "stepup-authz"
EXIT_FAILED = 1
EXIT_USAGE = 2


def _say(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def config_error(exc: ConfigError, what: str) -> int:
    """Print a refused settings/policy/input file: a header, then one line per problem."""
    problems = str(exc).splitlines()
    if len(problems) == 1:
        _say(f"{PROG}: {what}: {problems[0]}")
    else:
        _say(f"{PROG}: {what} ({len(problems)} problems):", *(f"  {p}" for p in problems))
    return EXIT_USAGE


def _start_failure(exc: BaseException, settings: Any) -> tuple[str, str] | None:
    """(what failed, what to do) for the ways ``serve`` fails to start, or None."""
    import redis.exceptions

    if isinstance(exc, OidcError):
        return (
            f"the OpenID provider {settings.oidc.issuer} did not answer as expected ({exc})",
            "check oidc.issuer (it must equal the provider's issuer exactly) and that the "
            "provider is reachable from here, then start again",
        )
    if isinstance(exc, KeysUnavailable):
        return (
            f"no token verification keys ({exc})",
            "check oidc.issuer (or oidc.jwks_url / oidc.jwks_file) and that the provider is "
            "reachable from here and publishes its JWKS",
        )
    if isinstance(exc, StoreError | redis.exceptions.RedisError):
        return (
            f"the session store failed ({exc.__class__.__name__}: {exc})",
            "check redis.url (or REDIS_URL), its password and TLS settings, and that it is up",
        )
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        return (
            f"{reason}" + (f": {exc.filename}" if exc.filename else ""),
            "check that no other process holds grpc.port / http.port and that the files "
            "the settings name are readable",
        )
    if isinstance(exc, RuntimeError) and "bind" in str(exc).lower():  # grpc's bind failure
        return (
            f"cannot listen on {settings.grpc.host}:{settings.grpc.port} ({exc})",
            "another process holds grpc.port: stop it or choose another port",
        )
    return None


def _cmd_serve(args: argparse.Namespace) -> int:
    from authz.config.settings import load_settings
    from authz.ops.logs import configure_logging
    from authz.ops.tracing import configure_tracing, shutdown_tracing

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return config_error(exc, "invalid settings")
    configure_logging(settings.log.level, settings.log.json_format)
    if args.workers > 1:
        from authz.ops.workers import supervise

        try:
            return supervise(args.config, settings, args.workers)
        except ConfigError as exc:
            return config_error(exc, "cannot start the workers")
    from authz.app import serve

    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        runner = asyncio.run
    configure_tracing(settings.tracing)
    try:
        runner(serve(settings))
    except ConfigError as exc:
        return config_error(exc, "cannot start")
    except Exception as exc:
        known = _start_failure(exc, settings)
        if known is None:
            raise
        _say(f"{PROG}: cannot start: {known[0]}", f"  {known[1]}")
        return EXIT_FAILED
    finally:
        shutdown_tracing()
    return 0


def _cmd_policy_check(args: argparse.Namespace) -> int:
    from authz.config.policy_file import read_policy

    if not args.file.is_file():
        _say(f"{PROG}: policy check: {args.file}: no such file")
        return EXIT_USAGE
    try:
        loaded = read_policy(args.file)
    except ConfigError as exc:
        config_error(exc, "invalid policy")
        return EXIT_FAILED  # the check ran and the policy failed it
    p = loaded.policy
    print(
        f"ok: {args.file}: {len(p.levels)} levels, {len(p.routes)} routes, "
        f"{len(p.rules)} rules; version {loaded.version}; sha256 {loaded.sha256}"
    )
    return 0


def _cmd_policy_explain(args: argparse.Namespace) -> int:
    from authz.config.explain_request import load_request
    from authz.config.policy_file import read_policy
    from authz.explain import explain, render_text

    try:
        loaded = read_policy(args.file)
    except ConfigError as exc:
        return config_error(exc, "invalid policy")
    try:
        doc = load_request(args.request)
    except ConfigError as exc:
        return config_error(exc, "invalid request file")
    try:
        out = explain(loaded, doc)
    except RequestError as exc:
        _say(f"{PROG}: invalid request file: {args.request}: the request cannot be decided: {exc}")
        return EXIT_USAGE
    print(json.dumps(out, indent=2) if args.json else render_text(out))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from authz.demo.__main__ import run

    return run(args)


def _no_demo(args: argparse.Namespace) -> int:
    _say(
        f"{PROG}: the demo is not part of this installation (a production image)",
        "  run it from a checkout: make demo",
    )
    return EXIT_USAGE


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in two lines (the error, where to read more) instead of
    the whole usage text; the subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n  see: {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    psub = pol.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
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

    d = sub.add_parser(
        "demo",
        help="start the demo: Envoy on :8080, the service, Valkey, the dev IdP",
        description="The whole stack on loopback, with a guide to try it (Ctrl-C stops it).",
    )
    try:
        from authz.demo.options import add_demo_arguments
    except ImportError:  # the production image ships neither the demo nor the dev IdP
        d.set_defaults(func=_no_demo)
    else:
        add_demo_arguments(d)
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
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILED
    except ConfigError as exc:
        return config_error(exc, "invalid input")
    except OSError as exc:  # a file or socket the command needed
        where = f": {exc.filename}" if exc.filename else ""
        _say(f"{PROG}: {args.command}: {exc.strerror or exc}{where}")
        return EXIT_FAILED
    except Exception as exc:
        if os.environ.get("STEPUP_TRACEBACK"):
            raise
        _say(
            f"{PROG}: unexpected error: {exc.__class__.__name__}: {exc}",
            "  this is a bug: run again with STEPUP_TRACEBACK=1 and report the traceback",
        )
        return EXIT_FAILED
    return result


if __name__ == "__main__":
    sys.exit(main())
