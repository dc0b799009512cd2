"""``stepup-authz sessions ...``: the Sessions API from the command line; prints JSON.

    stepup-authz sessions list        --user ISS SUB
    stepup-authz sessions revoke      --user ISS SUB (--session SID | --session-key KEY)
    stepup-authz sessions revoke-user --user ISS SUB
    stepup-authz sessions grant       --user ISS SUB --session SID --level L --acr A
                                      [--amr X ...] [--auth-time T] [--ttl S] [--device D]
                                      [--ip IP]

Common: ``--target host:port`` and either ``--token-file`` (bearer secret) or ``--cert``,
``--key``, ``--ca`` (mTLS). ``--ca`` alone with ``--token-file``: TLS plus the bearer.
Exit 0 on success; 1 with ``{"error": CODE, "details": ...}`` on stderr otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from authz.admin.proto.stepup.v1 import sessions_pb2, sessions_pb2_grpc


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
    g.add_argument("--acr", default="")
    g.add_argument("--amr", action="append", default=[], help="repeatable")
    g.add_argument("--auth-time", type=int, help="unix seconds (default: now)")
    g.add_argument("--ttl", type=int, default=0, help="seconds (default: the level's)")
    g.add_argument("--device", default="")
    g.add_argument("--ip", default="")


def _channel(args: argparse.Namespace) -> grpc.Channel:
    options: list[tuple[str, Any]] = []
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))
    if args.cert or args.key or args.ca:
        if bool(args.cert) != bool(args.key):
            raise SystemExit("--cert and --key go together")
        creds = grpc.ssl_channel_credentials(
            root_certificates=args.ca.read_bytes() if args.ca else None,
            private_key=args.key.read_bytes() if args.key else None,
            certificate_chain=args.cert.read_bytes() if args.cert else None,
        )
        return grpc.secure_channel(args.target, creds, options=options)
    return grpc.insecure_channel(args.target, options=options)


def _request(args: argparse.Namespace) -> tuple[str, Message]:
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
        acr=args.acr,
        amr=args.amr,
        ttl_s=args.ttl,
        device=args.device,
        ip=args.ip,
    )
    if args.auth_time is not None:
        req.auth_time = args.auth_time
    return "RecordGrant", req


def run_sessions(args: argparse.Namespace) -> int:
    metadata: list[tuple[str, str]] = []
    if args.token_file is not None:
        metadata.append(("authorization", f"Bearer {args.token_file.read_text().strip()}"))
    method, request = _request(args)
    with _channel(args) as channel:
        stub = sessions_pb2_grpc.SessionsStub(channel)  # type: ignore[no-untyped-call]
        try:
            reply = getattr(stub, method)(request, metadata=metadata, timeout=args.timeout)
        except grpc.RpcError as exc:
            err = {"error": exc.code().name, "details": exc.details()}
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
