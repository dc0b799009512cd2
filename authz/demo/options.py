"""The demo's command-line options, shared by ``stepup-authz demo`` and ``python -m
authz.demo`` (so ``make demo ARGS='--idp-port 9401'`` means the same in both).

Every port the demo listens on can be chosen; 0 picks a free one (the guide prints it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import authz

# = authz.demo.stack.REPO_ROOT, without importing the stack (the CLI builds this parser on
# every start).
REPO_ROOT = Path(authz.__file__).resolve().parent.parent

#: option dest -> (default, what listens there). The internal ones default to a free port.
PORT_OPTIONS: dict[str, tuple[int, str]] = {
    "port": (8080, "the Envoy listener: the app"),
    "admin_port": (9901, "Envoy's admin interface"),
    "idp_port": (9400, "the dev IdP"),
    "grpc_port": (0, "the service's gRPC ext_authz"),
    "http_port": (0, "the service's HTTP (/_stepup/*, /metrics)"),
    "upstream_port": (0, "the echo upstream"),
    "redis_port": (0, "the embedded Valkey"),
    "exporter_metrics_port": (0, "the audit exporter's metrics"),
}

#: Stack role (authz.demo.stack.Stack.listeners) -> the option that moves it.
ROLE_OPTION = {
    "the Envoy listener": "--port",
    "Envoy admin": "--admin-port",
    "the dev IdP": "--idp-port",
    "the service's gRPC": "--grpc-port",
    "the service's HTTP": "--http-port",
    "the echo upstream": "--upstream-port",
    "the embedded Valkey": "--redis-port",
    "the audit exporter's metrics": "--exporter-metrics-port",
}


def port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{n} is not a port (0-65535; 0 picks a free one)")
    return n


def _duration(text: str) -> str:
    try:
        seconds = float(text.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds like 0.25s, got {text!r}") from None
    if not 0 < seconds <= 60:
        raise argparse.ArgumentTypeError(f"expected 0-60 seconds, got {text!r}")
    return f"{seconds:g}s"


def policy_file(args: argparse.Namespace) -> Path:
    """The policy the demo runs: ``--policy``, else the example for the chosen factors."""
    if args.policy is not None:
        return Path(args.policy)
    name = "policy-passkeys.yaml" if args.passkeys else "policy.yaml"
    return REPO_ROOT / "examples" / name


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    for dest, (default, what) in PORT_OPTIONS.items():
        shown = f"default {default}" if default else "default: a free port"
        parser.add_argument(
            "--" + dest.replace("_", "-"),
            dest=dest,
            type=port,
            default=default,
            metavar="N",
            help=f"{what} ({shown}; 0 picks a free one)",
        )
    parser.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="policy file (default examples/policy.yaml; with --passkeys "
        "examples/policy-passkeys.yaml)",
    )
    parser.add_argument(
        "--passkeys",
        action="store_true",
        help="turn on the passkey factor: wires (level high) need a security key, enrolled "
        "after a TOTP step-up; open the app as http://localhost:PORT (docs/passkeys.md)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("var/demo"),
        help="logs, generated config and the audit archive (default ./var/demo)",
    )
    parser.add_argument("--redis-url", help="use this Redis instead of an embedded Valkey")
    parser.add_argument(
        "--authz-timeout",
        default="0.25s",
        metavar="DURATION",
        type=_duration,
        help="Envoy's ext_authz deadline (default 0.25s, as in production); raise it on a "
        "busy machine, where a late answer is Envoy's bare 403",
    )
    parser.add_argument(
        "--mode",
        choices=["grpc", "http"],
        default="grpc",
        help="Envoy's ext_authz protocol (default grpc); Envoy runs `render envoy --mode`",
    )
