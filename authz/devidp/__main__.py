"""Command line of the development OIDC provider.

    python -m authz.devidp serve --host 127.0.0.1 --port 9400 \\
        --issuer http://127.0.0.1:9400 --client-id stepup-authz --client-secret dev-secret \\
        --redirect-uri http://127.0.0.1:8080/_stepup/callback [--audience stepup-demo] \\
        [--config users.yaml] [--signing-key key.pem]
    python -m authz.devidp totp [--user alice] [--config users.yaml]

``serve`` prints ``devidp listening on http://HOST:PORT`` once it accepts connections, and
stops cleanly on SIGINT/SIGTERM. Built-in DEV users: alice/alice-password, bob/bob-password.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import pyotp

from authz.devidp import misbehave
from authz.devidp.app import base_url, bind, running
from authz.devidp.config import DevClient, DevIdpConfig, DevUser, default_users, load_file
from authz.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m authz.devidp", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the provider")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=9400, help="0 picks a free port")
    serve.add_argument("--issuer", help="default: http://HOST:PORT as bound")
    serve.add_argument("--client-id", default="stepup-authz")
    serve.add_argument("--client-secret", default="dev-secret")
    serve.add_argument(
        "--redirect-uri",
        action="append",
        help="repeatable; default http://127.0.0.1:8080/_stepup/callback",
    )
    serve.add_argument("--audience", default="stepup-demo", help="access token aud")
    serve.add_argument(
        "--backchannel-logout-uri", help="where the client gets logout tokens (POST)"
    )
    serve.add_argument(
        "--post-logout-redirect-uri",
        action="append",
        help="where /logout may send the browser back to (repeatable)",
    )
    serve.add_argument("--token-ttl", type=int, default=3600, help="seconds")
    serve.add_argument("--config", type=Path, help="YAML with extra users and clients")
    serve.add_argument("--signing-key", type=Path, help="RSA private key PEM (default: fresh)")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument(
        "--misbehave",
        metavar="JSON",
        help="TEST-ONLY: knobs that make the provider misbehave "
        '(authz.devidp.misbehave), e.g. \'{"acr": "pwd"}\'',
    )
    serve.add_argument(
        "--test-knobs",
        action="store_true",
        help="TEST-ONLY: let tests change the knobs with PUT /_test/misbehave",
    )
    totp = sub.add_parser("totp", help="print the current TOTP code of a dev user")
    totp.add_argument("--user", default="alice")
    totp.add_argument("--config", type=Path, help="YAML with extra users and clients")
    return parser


def _users(path: Path | None) -> tuple[dict[str, DevUser], dict[str, DevClient]]:
    users = default_users()
    clients: dict[str, DevClient] = {}
    if path is not None:
        extra_users, clients = load_file(path)
        users.update(extra_users)
    return users, clients


async def _serve(args: argparse.Namespace) -> None:
    users, clients = _users(args.config)
    redirect_uris = tuple(args.redirect_uri or ["http://127.0.0.1:8080/_stepup/callback"])
    clients[args.client_id] = DevClient(
        args.client_secret,
        redirect_uris,
        backchannel_logout_uri=args.backchannel_logout_uri,
        post_logout_redirect_uris=tuple(args.post_logout_redirect_uri or ()),
    )
    sock = bind(args.host, args.port)
    url = base_url(sock)
    config = DevIdpConfig(
        issuer=args.issuer or url,
        clients=clients,
        users=users,
        access_token_audience=args.audience,
        token_ttl_s=args.token_ttl,
        signing_key_path=args.signing_key,
        misbehave=misbehave.parse(args.misbehave),
        test_knobs=args.test_knobs,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running(config, sock):
        print(f"devidp listening on {url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "totp":
            users, _ = _users(args.config)
            if args.user not in users:
                print(
                    f"devidp totp: unknown user {args.user!r}; known: {', '.join(sorted(users))}",
                    file=sys.stderr,
                )
                return 2
            print(pyotp.TOTP(users[args.user].totp_secret).now())
            return 0
        logging.basicConfig(
            level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
        asyncio.run(_serve(args))
    except ConfigError as exc:
        print(f"devidp: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is taken
        print(f"devidp: {exc.strerror or exc}", file=sys.stderr)
        if args.command == "serve":
            print(f"  another process on {args.host}:{args.port}? choose --port", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
