"""``stepup-authz sessions ...``: the Sessions API from the command line; prints JSON.

    stepup-authz sessions list        --user ISS SUB
    stepup-authz sessions revoke      --user ISS SUB (--session SID | --session-key KEY)
    stepup-authz sessions revoke-user --user ISS SUB
    stepup-authz sessions grant       --user ISS SUB --session SID --level L
                                      --proof-file F [--ttl S] [--device D] [--ip IP]
    stepup-authz sessions proof       --key KEY.pem --issuer CALLER --user ISS SUB
                                      --session SID --level L --acr A [--amr X ...]
                                      [--auth-time T] [--kid K] [--audience A]
    stepup-authz sessions jwks        --key KEY.pem --kid K

``grant`` needs a proof signed with the caller's key (see authz/admin/proofs.py): a
factor service signs one per verified user; ``proof`` signs one from a private key (for
trying the API, and for tools that hold the caller's key); ``jwks`` prints the public
JWKS of that key for the caller's ``proof.jwks_file``. ``proof`` and ``jwks`` are offline.

Common: ``--target host:port`` and either ``--token-file`` (bearer secret) or ``--cert``,
``--key``, ``--ca`` (mTLS). ``--ca`` alone with ``--token-file``: TLS plus the bearer.
Exit 0 on success; 1 with ``{"error": CODE, "details": ...}`` on stderr otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a sessions command runs, not for every CLI start
    import grpc
    from google.protobuf.message import Message


def add_sessions_parser(subparsers: Any) -> None:
    """Add ``sessions`` to the top-level parser's subparsers (``func`` = ``run_sessions``)."""
    p = subparsers.add_parser("sessions", help="list, revoke or grant via the Sessions API")
    ssub = p.add_subparsers(dest="sessions_command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--target", required=True, help="the service's gRPC host:port")
        sp.add_argument("--user", nargs=2, metavar=("ISS", "SUB"), required=True)
        sp.add_argument("--token-file", type=Path, help="file holding the API bearer secret")
        sp.add_argument("--cert", type=Path, help="client certificate (PEM) for mTLS")
        sp.add_argument("--key", type=Path, help="client private key (PEM) for mTLS")
        sp.add_argument("--ca", type=Path, help="CA bundle (PEM) that signed the server")
        sp.add_argument("--server-name", help="expected server name, when not the target host")
        sp.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
        sp.set_defaults(func=run_sessions)

    common(ssub.add_parser("list", help="the user's sessions and live grants"))
    r = ssub.add_parser("revoke", help="revoke one session: the next Check refuses it")
    common(r)
    one = r.add_mutually_exclusive_group(required=True)
    one.add_argument("--session", help="the session id (sid)")
    one.add_argument("--session-key", help="the session key as `list` shows it")
    r.add_argument("--reason")
    u = ssub.add_parser("revoke-user", help="refuse every token issued before now")
    common(u)
    u.add_argument("--reason")
    g = ssub.add_parser("grant", help="record a grant (as an external factor service)")
    common(g)
    g.add_argument("--session", required=True, help="the session id (sid)")
    g.add_argument("--level", required=True)
    g.add_argument("--proof-file", type=Path, required=True, help="the signed proof (a JWT)")
    g.add_argument("--ttl", type=int, default=0, help="seconds (default: the level's)")
    g.add_argument("--device", default="")
    g.add_argument("--ip", default="")

    pr = ssub.add_parser("proof", help="sign a grant proof with a caller's private key")
    pr.add_argument("--key", type=Path, required=True, help="the caller's private key (PEM)")
    pr.add_argument("--kid", help="key id (as in the caller's JWKS)")
    pr.add_argument("--issuer", required=True, help="the caller's proof issuer")
    pr.add_argument("--audience", default="stepup-authz-api")
    pr.add_argument("--user", nargs=2, metavar=("ISS", "SUB"), required=True)
    pr.add_argument("--session", required=True)
    pr.add_argument("--level", required=True)
    pr.add_argument("--acr", required=True)
    pr.add_argument("--amr", action="append", default=[], help="repeatable")
    pr.add_argument("--auth-time", type=int, help="unix seconds (default: now)")
    pr.add_argument("--lifetime", type=int, default=120, help="seconds (default 120)")
    pr.set_defaults(func=run_proof)

    jw = ssub.add_parser("jwks", help="the public JWKS of a caller's private key")
    jw.add_argument("--key", type=Path, required=True)
    jw.add_argument("--kid", required=True)
    jw.set_defaults(func=run_jwks)


def run_proof(args: argparse.Namespace) -> int:
    from authz.admin.proofs import sign_proof

    now = int(time.time())
    try:
        token = sign_proof(
            args.key.read_bytes(),
            issuer=args.issuer,
            audience=args.audience,
            user_issuer=args.user[0],
            subject=args.user[1],
            session_id=args.session,
            level=args.level,
            acr=args.acr,
            amr=list(args.amr),
            auth_time=args.auth_time if args.auth_time is not None else now,
            kid=args.kid,
            now=now,
            lifetime_s=args.lifetime,
        )
    except (OSError, ValueError) as exc:
        print(f"stepup-authz: cannot sign the proof: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def run_jwks(args: argparse.Namespace) -> int:
    from authz.admin.proofs import public_jwks

    try:
        doc = public_jwks(args.key.read_bytes(), args.kid)
    except (OSError, ValueError) as exc:
        print(f"stepup-authz: cannot read the key: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(doc, indent=2))
    return 0


class _Usage(Exception):
    """A usage error: printed as one line, exit 2."""


def _read(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _Usage(f"cannot read {option} {path}: {exc.strerror}") from None


def _channel(args: argparse.Namespace) -> grpc.Channel:
    import grpc

    options: list[tuple[str, Any]] = []
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))
    if args.cert or args.key or args.ca:
        if bool(args.cert) != bool(args.key):
            raise _Usage("--cert and --key go together")
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(args.ca, "--ca"),
            private_key=_read(args.key, "--key"),
            certificate_chain=_read(args.cert, "--cert"),
        )
        return grpc.secure_channel(args.target, creds, options=options)
    return grpc.insecure_channel(args.target, options=options)


def _request(args: argparse.Namespace) -> tuple[str, Message]:
    from authz.admin.proto.stepup.v1 import sessions_pb2

    user = sessions_pb2.User(issuer=args.user[0], subject=args.user[1])
    cmd = args.sessions_command
    if cmd == "list":
        return "ListSessions", sessions_pb2.ListSessionsRequest(user=user)
    if cmd == "revoke":
        if args.session is not None:
            return "RevokeSession", sessions_pb2.RevokeSessionRequest(
                user=user, session_id=args.session, reason=args.reason or ""
            )
        return "RevokeSession", sessions_pb2.RevokeSessionRequest(
            user=user, session_key=args.session_key, reason=args.reason or ""
        )
    if cmd == "revoke-user":
        return "RevokeUser", sessions_pb2.RevokeUserRequest(user=user, reason=args.reason or "")
    req = sessions_pb2.RecordGrantRequest(
        user=user,
        session_id=args.session,
        level=args.level,
        ttl_s=args.ttl,
        device=args.device,
        ip=args.ip,
        proof=args.proof_file.read_text().strip(),
    )
    return "RecordGrant", req


def _explain(code: grpc.StatusCode, args: argparse.Namespace) -> str:
    """What a failed call means, and what to do about it."""
    import grpc

    target = args.target
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return (
            f"{target} does not serve the Sessions API: enable it in that service's settings "
            "(api.enabled: true) and point --target at its gRPC port"
        )
    if code is grpc.StatusCode.UNAVAILABLE:
        return (
            f"cannot reach the service at {target}: is it running, and is this its gRPC port "
            "(grpc.port)? A TLS port needs --ca"
        )
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{target} did not answer within {args.timeout:g} s (--timeout)"
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return (
            "the service refused the credentials: check --token-file (its "
            "api.bearer_secret_file) or the client certificate (api.allowed_peers)"
        )
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return "this caller may not do that (its scope in the service's api settings)"
    return "the service refused the request"


def run_sessions(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except _Usage as exc:
        print(f"stepup-authz sessions: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from authz.admin.proto.stepup.v1 import sessions_pb2_grpc

    metadata: list[tuple[str, str]] = []
    secret = _read(args.token_file, "--token-file")
    if secret is not None:
        token = secret.decode("utf-8", "replace").strip()
        if not token:
            raise _Usage(f"--token-file {args.token_file} is empty")
        metadata.append(("authorization", f"Bearer {token}"))
    method, request = _request(args)
    with _channel(args) as channel:
        stub = sessions_pb2_grpc.SessionsStub(channel)  # type: ignore[no-untyped-call]
        try:
            reply = getattr(stub, method)(request, metadata=metadata, timeout=args.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            err = {"error": code.name, "message": _explain(code, args), "details": exc.details()}
            print(json.dumps(err), file=sys.stderr)
            return 1
    doc = json_format.MessageToDict(
        reply,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )
    print(json.dumps(doc, indent=2, sort_keys=True))
    return 0
