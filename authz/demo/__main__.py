"""The local demo: the whole stack on loopback, and a short guide to try it.

    make demo                                  # or: .venv/bin/stepup-authz demo
    make demo ARGS='--port 8081 --idp-port 9401'
    .venv/bin/python -m authz.demo --help     # every port, the policy, the work directory

Every command the guide prints runs as printed in a fresh shell in the clone (a test runs
each of them against a live demo): tools are named by their path in the venv.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import FrameType

from authz.demo.options import ROLE_OPTION, add_demo_arguments, policy_file
from authz.demo.stack import CLIENT_ID, CLIENT_SECRET, PortInUse, Stack, StackError, WorkdirInUse

# Lines indented by five spaces are commands (continued by a trailing backslash); nothing
# else in the guide is indented that far, so a reader (and the test) can find every one.
_GUIDE = """\
stepup-authz demo is up  (logs and generated config: {workdir})

  app, through Envoy     {envoy}
  Envoy admin            {admin}
  stepup-authz HTTP      {http}   (gRPC ext_authz on {grpc})
  dev IdP                {idp}
  Redis                  {redis}

Run the commands below from {cwd} (paste them as they are; nothing needs activating).
Dev user: alice / alice-password. Her current TOTP code:
     {py} -m authz.devidp totp --user alice
Routes (demo policy): /accounts/ needs "elevated", /wires/ needs "high".

1. An API client without a token gets 401 WWW-Authenticate: Bearer
     curl -si {envoy}/accounts/123

2. A browser without a session is redirected (302) to sign in
     curl -si -H 'Accept: text/html' {envoy}/accounts/123

3. A password-only token is not enough: RFC 9470 insufficient_user_authentication challenge
     TOKEN=$(curl -s -u {client_id}:{client_secret} {token_endpoint} \\
       -d grant_type=password -d username=alice -d password=alice-password \\
       -d scope=openid | \\
       {take_token})
     curl -si -H "Authorization: Bearer $TOKEN" {envoy}/accounts/123
   With the TOTP code the token has acr=mfa, which satisfies "elevated": the echo upstream
   then shows the x-stepup-* headers the service injected (200).
     TOKEN=$(curl -s -u {client_id}:{client_secret} {token_endpoint} \\
       -d grant_type=password -d username=alice -d password=alice-password \\
       -d otp=$({py} -m authz.devidp totp --user alice) \\
       -d scope=openid | \\
       {take_token})
     curl -s -H "Authorization: Bearer $TOKEN" {envoy}/accounts/123
   (A refused token request prints the IdP's error and leaves TOKEN empty.)

4. The full step-up, in a browser: open {envoy}/accounts/123
   (sign in as alice, then enter the TOTP code when asked to step up)

5. The audit trail of that step-up. The service writes every authentication event to the
   Redis stream {stream}; the exporter moves them, in order and exactly once, into a
   hash-chained archive of JSON Lines segments with Ed25519-signed checkpoints:
   - archive  {audit}/
   - dev keys {keys}/  (the public key is what an examiner verifies with)
   The records for alice since the demo started (challenge, completion, allow):
     {cli} audit export --since {since} --user '{user}' \\
       --type stepup.challenge,stepup.completed,access.allowed --format jsonl {audit}
   (--format csv for a spreadsheet; drop --type to see sign-ins and denials too)
   The whole archive verifies (exit 0), signatures included:
     {cli} audit verify --pubkey {pubkey} {audit}
   Edit one field in a COPY, and verify names the segment, line and record (exit 1):
     rm -rf {copy} && cp -r {audit} {copy} && \\
       sed -i '0,/"outcome":"step_up"/s//"outcome":"allow"/' {copy}/audit-*.jsonl && \\
       {cli} audit verify --pubkey {pubkey} {copy}; echo "exit $?"
   Or delete the step-up's completion record from a fresh copy: verify reports it "deleted"
   (or "bad-checkpoint" when a signed checkpoint comes right after it), exit 1:
     rm -rf {copy} && cp -r {audit} {copy} && \\
       sed -i '0,/"type":"stepup.completed"/{{//d}}' {copy}/audit-*.jsonl && \\
       {cli} audit verify --pubkey {pubkey} {copy}; echo "exit $?"
   The newest archived records (drop --no-follow to follow them; Ctrl-C stops):
     {cli} audit tail --no-follow -n 5 {audit}

6. An evidence pack an examiner can take away (report.html, report.pdf, evidence.json,
   signed), for today, with the demo Envoy's coverage:
     {cli} evidence --archive {audit} --since {today} --until {tomorrow} \\
       --out {evidence} --signing-key {signing_key} \\
       --policy {policy} --security-report docs/security-tests.md --envoy-admin {admin}
     {cli} evidence verify {evidence} --pubkey {pubkey}
   Every decision of alice today:
     {cli} audit incident --user '{user}' --since {today} --until {tomorrow} {audit}

Envoy's JSON access log (with decision ids): {workdir}/envoy.log
Every port can be moved (0 picks a free one): make demo ARGS='--port 8081 --idp-port 9401'
{passkeys}Ctrl-C stops everything.
"""

_PASSKEYS_OFF = """\
Passkeys (a security key for wires, instead of the TOTP): make demo ARGS=--passkeys
"""

# Shown with --passkeys. WebAuthn wants a host name, so every browser step is on localhost.
_PASSKEYS_ON = """\
Passkeys are on (policy {policy}): "high" (/wires/) takes only a device-bound
security key unlocked by its PIN; "elevated" still comes from the TOTP. Use Chromium (or
any browser with WebAuthn) on {public}, not 127.0.0.1 (an IP cannot be an RP ID):
  a. open {public}/accounts/123, sign in as alice and enter the TOTP code: this
      IdP step-up to "elevated" lets you enrol a key for the next 5 minutes
  b. open {public}/_stepup/passkey/keys, name the key, press "Add security key"
      and touch it (no key at hand? Chromium's DevTools > More tools > WebAuthn >
      "Enable virtual authenticator environment", protocol ctap2, user verification on)
  c. open {public}/wires/1: press "Use my security key", touch it, and the
      echo upstream shows "x-stepup-level": "high" and "x-stepup-amr": "hwk user pin mfa"
  The keys page lists and removes your keys. What an operator sees:
     {cli} passkeys list --config {config}
  The demo's Valkey keeps nothing on disk, so the service warns at start that it would
  lose the credentials (docs/passkeys.md, "Recovery and durability").
"""

# Prints the access token, or exits non-zero with the IdP's answer: a failed token request
# must not leave a silently empty $TOKEN behind a 401 that looks like the wrong answer.
EXTRACT_ACCESS = (
    "python3 -c 'import json,sys; r=json.load(sys.stdin); "
    'print(r["access_token"]) if "access_token" in r '
    'else sys.exit("token request refused: %s" % r)\''
)


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
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if len(rel) < len(str(path)) else str(path)


def _venv_tool(name: str) -> str:
    """How to call a tool of this installation from the working directory: its path in
    the venv (``.venv/bin/stepup-authz``), never a bare name that needs an activated venv."""
    beside = Path(sys.executable).parent / name
    if name != "python" and not beside.exists():
        return f"{shlex.quote(_shown(Path(sys.executable)))} -m authz.cli"
    shown = _shown(beside if beside.exists() else Path(sys.executable))
    return shown if "/" in shown else f"./{shown}"


def _utc_minute(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(ts))


def guide(stack: Stack, started: float) -> str:
    passkeys = _PASSKEYS_OFF
    if stack.passkeys:
        passkeys = _PASSKEYS_ON.format(
            policy=_shown(stack.policy_file),
            public=stack.public_url,
            cli=_venv_tool("stepup-authz"),
            config=_shown(stack.workdir / "config.yaml"),
        )
    return _GUIDE.format(
        passkeys=passkeys,
        workdir=_shown(stack.workdir),
        cwd=Path.cwd(),
        envoy=stack.envoy_url,
        admin=stack.admin_url,
        http=stack.service_http_url,
        grpc=stack.grpc_target,
        idp=stack.idp_url,
        redis=stack.redis_url,
        token_endpoint=_token_endpoint(stack),
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        take_token=EXTRACT_ACCESS,
        py=_venv_tool("python"),
        cli=_venv_tool("stepup-authz"),
        stream=stack.audit_stream_key,
        audit=_shown(stack.audit_dir),
        keys=_shown(stack.audit_key_dir),
        pubkey=_shown(stack.audit_public_key),
        copy=_shown(stack.workdir / "audit-copy"),
        since=_utc_minute(started),
        user=f"{stack.idp_url}|alice",
        today=time.strftime("%Y-%m-%d", time.gmtime(started)),
        tomorrow=time.strftime("%Y-%m-%d", time.gmtime(started + 86_400)),
        signing_key=_shown(stack.audit_signing_key),
        policy=_shown(stack.policy_file),
        # One pack per demo run (a pack is never overwritten).
        evidence=_shown(
            stack.workdir / time.strftime("evidence-%Y%m%dT%H%M%SZ", time.gmtime(started))
        ),
    )


def _refusal(exc: StackError) -> str:
    if isinstance(exc, PortInUse):
        option = ROLE_OPTION.get(exc.role, "--port")
        return (
            f"demo not started: {exc} (another demo still running?)\n"
            f"  stop it, or choose another port: make demo ARGS='{option} N' (0: any free port)"
        )
    if isinstance(exc, WorkdirInUse):
        return (
            f"demo not started: {exc}\n"
            "  stop that demo, or give this one its own: make demo ARGS='--workdir var/demo2'"
        )
    return f"demo failed to start: {exc}"


def run(args: argparse.Namespace) -> int:
    """Start the stack, print the guide, and wait for Ctrl-C (or a component's death)."""
    stop = threading.Event()
    up = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if not up.is_set():  # abort a start in progress (start() stops what it began)
            raise KeyboardInterrupt

    internal = {
        name: getattr(args, f"{name}_port")
        for name in ("grpc", "http", "upstream", "redis", "exporter_metrics")
        if getattr(args, f"{name}_port")
    }
    try:
        stack = Stack(
            args.workdir,
            policy_file=policy_file(args),
            redis_url=args.redis_url,
            listen_port=args.port or None,  # 0: a free port, chosen before anything starts
            admin_port=args.admin_port or None,
            idp_port=args.idp_port or None,
            ports=internal,
            authz_timeout=args.authz_timeout,
            mode=args.mode,
            passkeys=args.passkeys,
        )
    except (OSError, ValueError) as exc:
        print(f"demo not started: {exc}", file=sys.stderr)
        return 2
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print("starting the demo stack ...", flush=True)
        started = time.time()
        stack.start()
        up.set()
        print(guide(stack, started), flush=True)
        watched = (
            ("service", "envoy", "exporter") if stack.runs_audit_exporter else ("service", "envoy")
        )
        while not stop.wait(1.0):
            if dead := [n for n in watched if n not in stack.running()]:
                print(f"{', '.join(dead)} exited; see {stack.workdir}", file=sys.stderr)
                return 1
        return 0
    except StackError as exc:
        print(_refusal(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if up.is_set():
            print("stopping ...", flush=True)
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m authz.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_demo_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
