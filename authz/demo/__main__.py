"""The local demo: the whole stack on loopback, and a short guide to try it.

python -m authz.demo [--port 8080] [--admin-port 9901] [--policy examples/policy.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import FrameType

from authz.demo.stack import CLIENT_ID, CLIENT_SECRET, REPO_ROOT, Stack, StackError

_GUIDE = """\
stepup-authz demo is up  (logs and generated config: {workdir})

  app, through Envoy     {envoy}
  Envoy admin            {admin}
  stepup-authz HTTP      {http}   (gRPC ext_authz on {grpc})
  dev IdP                {idp}
  Redis                  {redis}

Dev user: alice / alice-password; TOTP code: python -m authz.devidp totp
Routes (demo policy): /accounts/ needs "elevated", /wires/ needs "high".

1. An API client without a token gets 401 WWW-Authenticate: Bearer
     curl -si {envoy}/accounts/123

2. A browser without a session is redirected (302) to sign in
     curl -si -H 'Accept: text/html' {envoy}/accounts/123

3. A password-only token is not enough: RFC 9470 insufficient_user_authentication challenge
     TOKEN=$(curl -s -u {client_id}:{client_secret} {token_endpoint} \\
       -d grant_type=password -d username=alice -d password=alice-password \\
       -d scope=openid | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
     curl -si -H "Authorization: Bearer $TOKEN" {envoy}/accounts/123
   Add -d otp=$(python -m authz.devidp totp) to the token request for an acr=mfa token,
   which satisfies "elevated": the echo upstream then shows the injected x-stepup-* headers.

4. The full step-up, in a browser: open {envoy}/accounts/123
   (sign in as alice, then enter the TOTP code when asked to step up)

5. The audit trail of that step-up. The service writes every authentication event to the
   Redis stream {stream}; the exporter moves them, in order and exactly once, into a
   hash-chained archive of JSON Lines segments with Ed25519-signed checkpoints:
     archive  {audit}/
     dev keys {keys}/  (the public key is what an examiner verifies with)
   The chain of records for alice since the demo started (challenge, completion, allow):
     stepup-authz audit export --since {since} --user '{user}' \\
       --type stepup.challenge,stepup.completed,access.allowed --format jsonl {audit}
   (--format csv for a spreadsheet; drop --type to see sign-ins and denials too)
   The whole archive verifies (exit 0), signatures included:
     stepup-authz audit verify --pubkey {pubkey} {audit}
   Edit one field in a COPY, and verify names the segment, line and record (exit 1):
     rm -rf /tmp/audit-copy && cp -r {audit} /tmp/audit-copy && \\
       sed -i '0,/"outcome":"step_up"/s//"outcome":"allow"/' /tmp/audit-copy/audit-*.jsonl && \\
       stepup-authz audit verify --pubkey {pubkey} /tmp/audit-copy; echo "exit $?"
   Or delete the step-up's completion record from a fresh copy: verify reports "deleted":
     rm -rf /tmp/audit-copy && cp -r {audit} /tmp/audit-copy && \\
       sed -i '0,/"type":"stepup.completed"/{{//d}}' /tmp/audit-copy/audit-*.jsonl && \\
       stepup-authz audit verify --pubkey {pubkey} /tmp/audit-copy; echo "exit $?"
   Follow new records as they are archived: stepup-authz audit tail {audit}

Envoy's JSON access log (with decision ids): {workdir}/envoy.log
Ctrl-C stops everything.
"""


def _token_endpoint(stack: Stack) -> str:
    """The IdP's token endpoint from its discovery document (fallback: issuer + /token)."""
    url = f"{stack.idp_url}/.well-known/openid-configuration"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as resp:
            return str(json.load(resp)["token_endpoint"])
    except (OSError, ValueError, KeyError):
        return f"{stack.idp_url}/token"


def _shown(path: Path) -> str:
    """A path as short as it can be typed from here: relative to the working directory."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _utc_minute(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(ts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m authz.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=8080, help="Envoy listener (default 8080)")
    parser.add_argument("--admin-port", type=int, default=9901, help="Envoy admin (9901)")
    parser.add_argument("--idp-port", type=int, default=9400, help="dev IdP (default 9400)")
    parser.add_argument("--policy", type=Path, default=REPO_ROOT / "examples" / "policy.yaml")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("var/demo"),
        help="logs and generated config (default ./var/demo)",
    )
    parser.add_argument("--redis-url", help="use this Redis instead of an embedded Valkey")
    parser.add_argument(
        "--mode",
        choices=["grpc", "http"],
        default="grpc",
        help="Envoy's ext_authz protocol (default grpc); Envoy runs `render envoy --mode`",
    )
    args = parser.parse_args(argv)

    stop = threading.Event()
    up = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if not up.is_set():  # abort a start in progress (start() stops what it began)
            raise KeyboardInterrupt

    stack = Stack(
        args.workdir,
        policy_file=args.policy,
        redis_url=args.redis_url,
        listen_port=args.port,
        admin_port=args.admin_port,
        idp_port=args.idp_port,
        mode=args.mode,
    )
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print("starting the demo stack ...", flush=True)
        started = time.time()
        stack.start()
        up.set()
        print(
            _GUIDE.format(
                workdir=stack.workdir,
                envoy=stack.envoy_url,
                admin=stack.admin_url,
                http=stack.service_http_url,
                grpc=stack.grpc_target,
                idp=stack.idp_url,
                redis=stack.redis_url,
                token_endpoint=_token_endpoint(stack),
                client_id=CLIENT_ID,
                client_secret=CLIENT_SECRET,
                stream=stack.audit_stream_key,
                audit=_shown(stack.audit_dir),
                keys=_shown(stack.audit_key_dir),
                pubkey=_shown(stack.audit_public_key),
                since=_utc_minute(started),
                user=f"{stack.idp_url}|alice",
            ),
            flush=True,
        )
        watched = (
            ("service", "envoy", "exporter") if stack.runs_audit_exporter else ("service", "envoy")
        )
        while not stop.wait(1.0):
            if dead := [n for n in watched if n not in stack.running()]:
                print(f"{', '.join(dead)} exited; see {stack.workdir}", file=sys.stderr)
                return 1
        return 0
    except StackError as exc:
        print(f"demo failed to start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        print("stopping ...", flush=True)
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
