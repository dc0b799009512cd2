"""The stepup.v1.Sessions API in-process (grpc.aio on port 0, a real stub, a real Redis):
RecordGrant seen by read_check, refusals, caller authentication (bearer and an mTLS
allowlist), ListSessions, revocations, the audit trail, and the `sessions` CLI."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from authz.admin.api import SessionsServicer, add_to_server
from authz.admin.auth import CallerAuth
from authz.admin.cli import add_sessions_parser
from authz.admin.proto.stepup.v1 import sessions_pb2 as pb
from authz.admin.proto.stepup.v1 import sessions_pb2_grpc
from authz.audit.events import AuditEvent, EventType
from authz.config.settings import RedisSettings
from authz.core.policy import load_policy
from authz.core.session import UserState, session_key, user_key
from authz.store.connections import make_client
from authz.store.sessions import RedisSessionStore
from tests.tlsutil import cert as tls_cert
from tests.tlsutil import pem

pytestmark = pytest.mark.integration

ISS, SUB, SID = "https://idp.example", "alice", "sid-1"
UK, SK = user_key(ISS, SUB), session_key(ISS, SUB, SID)
SECRET = "s3cret-api-token-0123456789"
POLICY = load_policy(
    {
        "levels": {
            "standard": {},
            "elevated": {"acr": ["mfa", "phr"], "max_age": 900},
            "high": {"acr": ["phr"], "amr_any": ["hwk", "fido"], "max_age": 300},
        },
        "routes": [],
        "default_level": "standard",
    }
)
USER = pb.User(issuer=ISS, subject=SUB)


# --- PKI (tests/tlsutil.py) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = tls_cert("test-ca", ca_key, None, ca_key, ca=True)
    (d / "ca.pem").write_bytes(pem(ca))
    files = {"ca": d / "ca.pem"}
    people: dict[str, tuple[str, list[x509.GeneralName]]] = {
        "server": (
            "localhost",
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ),
        "push": (
            "push-mfa",
            [x509.UniformResourceIdentifier("spiffe://mesh.example/ns/mfa/sa/push")],
        ),
        "envoy": ("envoy", [x509.DNSName("envoy.mesh.example")]),  # same CA, not allowed
    }
    for who, (cn, sans) in people.items():
        key = ec.generate_private_key(ec.SECP256R1())
        (d / f"{who}.pem").write_bytes(pem(tls_cert(cn, key, ca, ca_key, ca=False, sans=sans)))
        (d / f"{who}-key.pem").write_bytes(pem(key))
        files[who], files[f"{who}-key"] = d / f"{who}.pem", d / f"{who}-key.pem"
    yield files


# --- the in-process server ----------------------------------------------------------------


class Audit:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.fail = False

    async def __call__(self, event: AuditEvent) -> None:  # like Auditor.durable
        if self.fail:
            raise RuntimeError("audit sink down")
        self.events.append(event)


class Api:
    def __init__(self, store: RedisSessionStore, audit: Audit, plain: int, tls: int) -> None:
        self.store, self.audit = store, audit
        self.plain_target = f"127.0.0.1:{plain}"
        self.tls_target = f"127.0.0.1:{tls}"

    async def read(self, now: int | None = None, session: str = SK) -> UserState:
        return await self.store.read_check(
            user=UK,
            session=session,
            levels=POLICY.grant_levels or ("elevated", "high"),
            level="high",
            device="yubi-1",
            ip="192.0.2.10",
            sensitive=False,
            window_s=60,
            now=int(time.time()) if now is None else now,
        )


@pytest.fixture
async def api(redis_url: str, redis_prefix: str, pki: dict[str, Path]) -> AsyncIterator[Api]:
    store = RedisSessionStore(
        make_client(redis_url, RedisSettings()), prefix=redis_prefix, deadline_ms=2000
    )
    audit = Audit()
    auth = CallerAuth(
        allowed_peers=["spiffe://mesh.example/ns/mfa/sa/push"], bearer_secret=SECRET.encode()
    )
    servicer = SessionsServicer(store, levels=POLICY.by_name.get, auth=auth, audit=audit, leeway=30)
    server = grpc.aio.server()
    add_to_server(servicer, server)
    plain = server.add_insecure_port("127.0.0.1:0")
    creds = grpc.ssl_server_credentials(
        [(pki["server-key"].read_bytes(), pki["server"].read_bytes())],
        root_certificates=pki["ca"].read_bytes(),
        require_client_auth=True,
    )
    tls = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield Api(store, audit, plain, tls)
    finally:
        await server.stop(1)
        await store.aclose()


@contextlib.asynccontextmanager
async def stub(
    target: str, creds: grpc.ChannelCredentials | None = None
) -> AsyncIterator[sessions_pb2_grpc.SessionsStub]:
    channel = (
        grpc.aio.secure_channel(target, creds)
        if creds is not None
        else grpc.aio.insecure_channel(target)
    )
    async with channel:
        yield sessions_pb2_grpc.SessionsStub(channel)  # type: ignore[no-untyped-call]


BEARER = (("authorization", f"Bearer {SECRET}"),)


def grant_request(**kw: Any) -> pb.RecordGrantRequest:
    doc: dict[str, Any] = {
        "user": USER,
        "session_id": SID,
        "level": "high",
        "acr": "phr",
        "amr": ["hwk"],
        "device": "yubi-1",
        "ip": "::ffff:192.0.2.10",
    }
    doc.update(kw)
    return pb.RecordGrantRequest(**doc)


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    code: grpc.StatusCode = info.value.code()
    return code


# --- tests ---------------------------------------------------------------------------------


async def test_record_grant_is_seen_by_read_check(api: Api) -> None:
    now = int(time.time())
    async with stub(api.plain_target) as s:
        reply = await s.RecordGrant(grant_request(auth_time=now - 10), metadata=BEARER)
    assert reply.session_key == SK
    assert reply.grant_id == f"{SK}:high"
    assert reply.expires_at == now - 10 + 300  # the level's max_age from auth_time
    state = await api.read(now)
    (g,) = state.grants
    assert (g.level, g.evidence.acr, g.evidence.amr, g.evidence.auth_time) == (
        "high",
        "phr",
        ("hwk",),
        now - 10,
    )
    assert (g.device, g.ip) == ("yubi-1", "192.0.2.10")  # IPv4-mapped normalised
    assert (state.device_known, state.ip_known) == (True, True)
    (ev,) = api.audit.events
    rec = ev.to_record()
    assert (rec["type"], rec["outcome"], rec["actor"], rec["via"], rec["level"]) == (
        "stepup.completed",
        "success",
        "bearer",
        "api",
        "high",
    )
    assert rec["session"] == SK and rec["user"] == f"{ISS}|{SUB}"


async def test_ttl_is_capped_by_the_level(api: Api) -> None:
    now = int(time.time())
    async with stub(api.plain_target) as s:
        short = await s.RecordGrant(grant_request(auth_time=now, ttl_s=60), metadata=BEARER)
        long = await s.RecordGrant(grant_request(auth_time=now, ttl_s=10_000), metadata=BEARER)
    assert short.expires_at == now + 60
    assert long.expires_at == now + 300


@pytest.mark.parametrize(
    ("kw", "slug"),
    [
        ({"level": "nope"}, "level-unknown"),
        ({"acr": "mfa"}, "acr-insufficient"),  # high needs phr
        ({"amr": ["otp"]}, "amr-insufficient"),  # high needs hwk or fido
        ({"auth_time": 1}, "auth-too-old"),  # beyond max_age
        ({"auth_time": 2**40}, "auth-time-future"),
        ({"ip": "not-an-ip"}, "argument-invalid"),
        ({"session_id": ""}, "argument-invalid"),
        ({"user": pb.User(issuer=ISS)}, "argument-invalid"),
    ],
)
async def test_invalid_grants_are_refused_and_audited(
    api: Api, kw: dict[str, Any], slug: str
) -> None:
    async with stub(api.plain_target) as s:
        assert await code_of(s.RecordGrant(grant_request(**kw), metadata=BEARER)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    assert (await api.read()).grants == ()
    (ev,) = api.audit.events
    assert (ev.type, ev.outcome, ev.reason) == (EventType.STEPUP_COMPLETED, "failure", slug)


async def test_unauthenticated_callers(api: Api, pki: dict[str, Path]) -> None:
    root = pki["ca"].read_bytes()
    bad_meta = [
        (),
        (("authorization", "Bearer wrong-secret-0123456789"),),
        (("authorization", SECRET),),
        (("authorization", f"Basic {SECRET}"),),
    ]
    async with stub(api.plain_target) as s:
        for meta in bad_meta:
            for call in (
                s.RecordGrant(grant_request(), metadata=meta),
                s.ListSessions(pb.ListSessionsRequest(user=USER), metadata=meta),
                s.RevokeSession(pb.RevokeSessionRequest(user=USER, session_id=SID), metadata=meta),
                s.RevokeUser(pb.RevokeUserRequest(user=USER), metadata=meta),
            ):
                assert await code_of(call) == grpc.StatusCode.UNAUTHENTICATED
    # mTLS with a certificate from the right CA that is not on the allowlist.
    envoy = grpc.ssl_channel_credentials(
        root, pki["envoy-key"].read_bytes(), pki["envoy"].read_bytes()
    )
    async with stub(api.tls_target, envoy) as s:
        assert await code_of(s.RecordGrant(grant_request())) == grpc.StatusCode.UNAUTHENTICATED
        # ... but the bearer still works over that TLS connection.
        await s.RecordGrant(grant_request(auth_time=int(time.time())), metadata=BEARER)
    assert len((await api.read()).grants) == 1
    assert [e.details["actor"] for e in api.audit.events] == ["bearer"]


async def test_mtls_allowlisted_peer(api: Api, pki: dict[str, Path]) -> None:
    push = grpc.ssl_channel_credentials(
        pki["ca"].read_bytes(), pki["push-key"].read_bytes(), pki["push"].read_bytes()
    )
    async with stub(api.tls_target, push) as s:
        await s.RecordGrant(grant_request(auth_time=int(time.time())))
    assert len((await api.read()).grants) == 1
    (ev,) = api.audit.events
    assert ev.details["actor"] == "peer:spiffe://mesh.example/ns/mfa/sa/push"


async def test_audit_unavailable_means_no_grant(api: Api) -> None:
    api.audit.fail = True
    async with stub(api.plain_target) as s:
        assert (
            await code_of(s.RecordGrant(grant_request(auth_time=int(time.time())), metadata=BEARER))
            == grpc.StatusCode.UNAVAILABLE
        )
    assert (await api.read()).grants == ()


async def test_list_and_revoke(api: Api) -> None:
    now = int(time.time())
    async with stub(api.plain_target) as s:
        await s.RecordGrant(grant_request(auth_time=now - 1), metadata=BEARER)
        await s.RecordGrant(
            grant_request(
                session_id="sid-2",
                level="elevated",
                acr="mfa",
                amr=["otp"],
                auth_time=now - 1,
                device="",
                ip="",
            ),
            metadata=BEARER,
        )
        listed = await s.ListSessions(pb.ListSessionsRequest(user=USER), metadata=BEARER)
        by_key = {x.session_key: x for x in listed.sessions}
        assert set(by_key) == {SK, session_key(ISS, SUB, "sid-2")}
        mine = by_key[SK]
        assert (mine.device, mine.ip, [g.level for g in mine.grants]) == (
            "yubi-1",
            "192.0.2.10",
            ["high"],
        )

        r = await s.RevokeSession(
            pb.RevokeSessionRequest(user=USER, session_key=SK, reason="lost token"), metadata=BEARER
        )
        assert (r.known, r.session_key) == (True, SK)
        state = await api.read(now)
        assert (state.session_revoked, state.grants) == (True, ())
        assert (
            await code_of(
                s.RevokeSession(
                    pb.RevokeSessionRequest(user=USER, session_key="not-a-key"), metadata=BEARER
                )
            )
            == grpc.StatusCode.INVALID_ARGUMENT
        )

        u = await s.RevokeUser(pb.RevokeUserRequest(user=USER), metadata=BEARER)
        assert u.sessions == 1 and abs(u.revoked_before - now) <= 2
        other = await api.read(now, session=session_key(ISS, SUB, "sid-2"))
        assert other.grants == () and other.revoked_before == u.revoked_before
        listed = await s.ListSessions(pb.ListSessionsRequest(user=USER), metadata=BEARER)
        assert list(listed.sessions) == []
    revoked = [e.to_record() for e in api.audit.events if e.type is EventType.GRANT_REVOKED]
    assert [(r["session"], r["reason"], r["revoked"], r["actor"]) for r in revoked] == [
        (SK, "lost token", 1, "bearer"),
        ("*", "api-revoke-user", 1, "bearer"),
    ]


# --- the CLI against the same server --------------------------------------------------------


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="stepup-authz")
    add_sessions_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = args.func(args)
    return rc, out.getvalue(), err.getvalue()


async def cli(*argv: str) -> tuple[int, Any, str]:
    # The CLI's channel is blocking: run it off the loop that serves the in-process server.
    rc, out, err = await asyncio.to_thread(_run_cli, list(argv))
    return rc, json.loads(out) if out else None, err


async def test_cli(api: Api, pki: dict[str, Path], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(SECRET + "\n")
    user = ["--user", ISS, SUB]
    bearer = ["--target", api.plain_target, "--token-file", str(token)]
    now = int(time.time())

    rc, out, _ = await cli(
        "sessions",
        "grant",
        *bearer,
        *user,
        "--session",
        SID,
        "--level",
        "elevated",
        "--acr",
        "mfa",
        "--amr",
        "otp",
        "--auth-time",
        str(now),
        "--device",
        "laptop",
    )
    assert rc == 0 and out["session_key"] == SK and out["expires_at"] == now + 900
    rc, out, _ = await cli("sessions", "list", *bearer, *user)
    assert rc == 0
    (sess,) = out["sessions"]
    assert (sess["session_key"], sess["device"], sess["grants"][0]["level"]) == (
        SK,
        "laptop",
        "elevated",
    )

    mtls = [
        "--target",
        api.tls_target,
        "--ca",
        str(pki["ca"]),
        "--cert",
        str(pki["push"]),
        "--key",
        str(pki["push-key"]),
    ]
    rc, out, _ = await cli("sessions", "revoke", *mtls, *user, "--session", SID)
    assert (rc, out) == (0, {"known": True, "session_key": SK})
    assert (await api.read(now)).session_revoked is True
    rc, out, _ = await cli("sessions", "revoke-user", *mtls, *user, "--reason", "offboarded")
    assert rc == 0 and out["sessions"] == 0 and out["revoked_before"] >= now

    rc, out, err = await cli("sessions", "list", "--target", api.plain_target, *user)
    assert (rc, out, json.loads(err)["error"]) == (1, None, "UNAUTHENTICATED")
    rc, out, err = await cli(
        "sessions", "grant", *bearer, *user, "--session", SID, "--level", "high", "--acr", "mfa"
    )
    assert (rc, json.loads(err)["error"]) == (1, "INVALID_ARGUMENT")
