"""The stepup.v1.Sessions API in-process (grpc.aio on port 0, a real stub, a real Redis):
each caller authenticated on its own (mTLS SAN or its own bearer secret, never the CN),
limited to its scopes, a grant only with a proof signed by the caller's key and used once,
refusals, ListSessions (audited), revocations, rate limits, and the `sessions` CLI.

The attacker's stories (docs/threat-model.md, section 4): a holder of any one transport
credential tries to mint a grant for any user (no proof, another caller's proof, a replayed
proof, a proof for another session, a level or factor beyond its scope), to read or revoke
sessions it may not, or to pass as another caller with a certificate whose CN says so."""

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
from authz.admin.auth import Callers, RateLimiter
from authz.admin.cli import add_sessions_parser
from authz.admin.config import ApiSettings
from authz.admin.proofs import ProofVerifier, public_jwks, sign_proof
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
HELPDESK_SECRET = "helpdesk-secret-0123456789"
LOWLY_SECRET = "lowly-secret-0123456789ab"
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
        # A certificate whose CN is the push service's SAN: the CN must never identify.
        "cn-only": ("spiffe://mesh.example/ns/mfa/sa/push", [x509.DNSName("x.mesh.example")]),
    }
    for who, (cn, sans) in people.items():
        key = ec.generate_private_key(ec.SECP256R1())
        (d / f"{who}.pem").write_bytes(pem(tls_cert(cn, key, ca, ca_key, ca=False, sans=sans)))
        (d / f"{who}-key.pem").write_bytes(pem(key))
        files[who], files[f"{who}-key"] = d / f"{who}.pem", d / f"{who}-key.pem"
    yield files


# --- callers, their keys and the in-process server -------------------------------------------

PUSH_SAN = "spiffe://mesh.example/ns/mfa/sa/push"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each caller's proof signing key (private PEM) and its public JWKS file."""
    d = tmp_path_factory.mktemp("proof-keys")
    out: dict[str, Path] = {}
    for who in ("push", "lowly", "stranger"):
        key = ec.generate_private_key(ec.SECP256R1())
        (d / f"{who}.pem").write_bytes(pem(key))
        (d / f"{who}.jwks").write_text(json.dumps(public_jwks(pem(key), f"{who}-1")))
        out[who], out[f"{who}-jwks"] = d / f"{who}.pem", d / f"{who}.jwks"
    return out


def api_settings(pki: dict[str, Path], keys: dict[str, Path], tmp: Path) -> ApiSettings:
    (tmp / "helpdesk").write_text(HELPDESK_SECRET)
    (tmp / "lowly").write_text(LOWLY_SECRET)
    return ApiSettings.model_validate(
        {
            "enabled": True,
            "tls": {
                "cert_file": pki["server"],
                "key_file": pki["server-key"],
                "client_ca_file": pki["ca"],
            },
            "callers": [
                {
                    "name": "push",
                    "mtls_names": [PUSH_SAN],
                    "operations": ["record-grant", "revoke"],
                    "max_level": "high",
                    "issuers": [ISS],
                    "acr": ["phr", "mfa"],
                    "amr": ["hwk", "otp", "pwd"],
                    "proof": {"issuer": "push", "jwks_file": keys["push-jwks"]},
                },
                {
                    "name": "lowly",
                    "bearer_secret_file": tmp / "lowly",
                    "operations": ["record-grant"],
                    "max_level": "elevated",
                    "issuers": [ISS],
                    "acr": ["mfa"],
                    "amr": ["otp"],
                    "proof": {"issuer": "lowly", "jwks_file": keys["lowly-jwks"]},
                    "rate_per_minute": 30,
                },
                {
                    "name": "helpdesk",
                    "bearer_secret_file": tmp / "helpdesk",
                    "operations": ["list", "revoke"],
                },
            ],
        }
    )


class Audit:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.fail = False

    async def __call__(self, event: AuditEvent) -> None:  # like Auditor.durable
        if self.fail:
            raise RuntimeError("audit sink down")
        self.events.append(event)


class Clock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


class Api:
    def __init__(
        self, store: RedisSessionStore, audit: Audit, plain: int, tls: int, clock: Clock
    ) -> None:
        self.store, self.audit, self.clock = store, audit, clock
        self.plain_target = f"127.0.0.1:{plain}"
        self.tls_target = f"127.0.0.1:{tls}"

    @property
    def now(self) -> int:
        return int(self.clock())

    async def read(self, session: str = SK) -> UserState:
        return await self.store.read_check(
            user=UK,
            session=session,
            levels=POLICY.grant_levels or ("elevated", "high"),
            level="high",
            device="yubi-1",
            ip="192.0.2.10",
            sensitive=False,
            window_s=60,
            now=self.now,
        )


@pytest.fixture
async def api(
    redis_url: str,
    redis_prefix: str,
    pki: dict[str, Path],
    keys: dict[str, Path],
    tmp_path: Path,
) -> AsyncIterator[Api]:
    store = RedisSessionStore(
        make_client(redis_url, RedisSettings()), prefix=redis_prefix, deadline_ms=2000
    )
    audit, clock = Audit(), Clock()
    settings = api_settings(pki, keys, tmp_path)
    proofs = {c.name: ProofVerifier(c, settings) for c in settings.callers if c.proof}
    for v in proofs.values():
        await v.start()
    servicer = SessionsServicer(
        store,
        levels=POLICY.by_name.get,
        callers=Callers.from_settings(settings.callers),
        proofs=proofs,
        idp_issuers=frozenset({ISS}),
        audit=audit,
        clock=clock,
        limiter=RateLimiter(clock=clock),
        leeway=30,
    )
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
        yield Api(store, audit, plain, tls, clock)
    finally:
        await server.stop(1)
        for v in proofs.values():
            await v.aclose()
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


def mtls(pki: dict[str, Path], who: str = "push") -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        pki["ca"].read_bytes(), pki[f"{who}-key"].read_bytes(), pki[who].read_bytes()
    )


HELPDESK = (("authorization", f"Bearer {HELPDESK_SECRET}"),)
LOWLY = (("authorization", f"Bearer {LOWLY_SECRET}"),)


def proof(keys: dict[str, Path], api: Api, *, who: str = "push", **kw: Any) -> str:
    claims: dict[str, Any] = {
        "issuer": who,
        "audience": "stepup-authz-api",
        "user_issuer": ISS,
        "subject": SUB,
        "session_id": SID,
        "level": "high",
        "acr": "phr",
        "amr": ["hwk"],
        "auth_time": api.now - 10,
        "kid": f"{who}-1",
        "now": api.now,
    }
    claims.update(kw)
    return sign_proof(keys[claims.pop("signer", who)].read_bytes(), **claims)


def grant_request(proof_: str, **kw: Any) -> pb.RecordGrantRequest:
    doc: dict[str, Any] = {
        "user": USER,
        "session_id": SID,
        "level": "high",
        "device": "yubi-1",
        "ip": "::ffff:192.0.2.10",
        "proof": proof_,
    }
    doc.update(kw)
    return pb.RecordGrantRequest(**doc)


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


# --- grants ------------------------------------------------------------------------------------


async def test_a_grant_with_the_callers_own_proof_is_seen_by_the_check(
    api: Api, pki: dict[str, Path], keys: dict[str, Path]
) -> None:
    now = api.now
    async with stub(api.tls_target, mtls(pki)) as s:
        reply = await s.RecordGrant(grant_request(proof(keys, api, jti="p-1")))
    assert (reply.session_key, reply.grant_id) == (SK, f"{SK}:high")
    assert reply.expires_at == now - 10 + 300  # the level's max_age from the proof's auth_time
    state = await api.read()
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
    assert (rec["type"], rec["outcome"], rec["actor"], rec["via"], rec["proof_jti"]) == (
        "stepup.completed",
        "success",
        "push",
        "api",
        "p-1",
    )
    assert rec["session"] == SK and rec["user"] == f"{ISS}|{SUB}"


async def test_ttl_is_capped_by_the_level(
    api: Api, pki: dict[str, Path], keys: dict[str, Path]
) -> None:
    async with stub(api.tls_target, mtls(pki)) as s:
        p1 = proof(keys, api, auth_time=api.now)
        short = await s.RecordGrant(grant_request(p1, ttl_s=60))
        long = await s.RecordGrant(grant_request(proof(keys, api, auth_time=api.now), ttl_s=10**4))
    assert short.expires_at == api.now + 60
    assert long.expires_at == api.now + 300


async def test_a_transport_credential_alone_mints_nothing(api: Api) -> None:
    async with stub(api.plain_target) as s:
        code, details = await code_of(
            s.RecordGrant(grant_request("", level="elevated"), metadata=LOWLY)
        )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "proof" in details
    assert (await api.read()).grants == ()
    (ev,) = api.audit.events
    assert (ev.outcome, ev.reason, ev.details["actor"]) == ("failure", "proof-invalid", "lowly")


async def test_a_replayed_proof_is_refused(
    api: Api, pki: dict[str, Path], keys: dict[str, Path]
) -> None:
    once = proof(keys, api, jti="only-once")
    async with stub(api.tls_target, mtls(pki)) as s:
        await s.RecordGrant(grant_request(once))
        code, _ = await code_of(s.RecordGrant(grant_request(once, session_id=SID)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert [e.reason for e in api.audit.events] == ["success", "proof-replayed"]


@pytest.mark.parametrize(
    ("kw", "slug"),
    [
        ({"signer": "stranger"}, "proof-invalid"),  # signed with a key not the caller's
        ({"issuer": "lowly"}, "proof-invalid"),  # another caller's issuer name
        ({"audience": "some-other-api"}, "proof-invalid"),
        ({"lifetime_s": 3600}, "proof-invalid"),  # longer than proof.max_lifetime_s
        ({"now": 0}, "proof-invalid"),  # expired long ago
    ],
)
async def test_a_proof_that_does_not_verify_is_refused(
    api: Api, pki: dict[str, Path], keys: dict[str, Path], kw: dict[str, Any], slug: str
) -> None:
    async with stub(api.tls_target, mtls(pki)) as s:
        code, _ = await code_of(s.RecordGrant(grant_request(proof(keys, api, **kw))))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert (await api.read()).grants == ()
    assert [e.reason for e in api.audit.events] == [slug]


@pytest.mark.parametrize(
    "kw",
    [{"subject": "bob"}, {"session_id": "another-sid"}, {"level": "elevated", "acr": "mfa"}],
)
async def test_a_proof_for_another_user_session_or_level_is_refused(
    api: Api, pki: dict[str, Path], keys: dict[str, Path], kw: dict[str, Any]
) -> None:
    async with stub(api.tls_target, mtls(pki)) as s:
        code, details = await code_of(s.RecordGrant(grant_request(proof(keys, api, **kw))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "another" in details
    assert (await api.read()).grants == ()


@pytest.mark.parametrize(
    ("kw", "slug"),
    [
        ({"level": "high", "acr": "phr", "amr": ["hwk"]}, "out-of-scope"),  # above max_level
        ({"level": "elevated", "acr": "phr", "amr": ["otp"]}, "out-of-scope"),  # acr
        ({"level": "elevated", "acr": "mfa", "amr": ["hwk"]}, "out-of-scope"),  # amr
        (
            {"level": "elevated", "acr": "mfa", "amr": ["otp"], "user_issuer": "https://evil"},
            "out-of-scope",
        ),
    ],
)
async def test_a_grant_beyond_the_callers_scope_is_refused(
    api: Api, keys: dict[str, Path], kw: dict[str, Any], slug: str
) -> None:
    p = proof(keys, api, who="lowly", **kw)
    user = pb.User(issuer=kw.get("user_issuer", ISS), subject=SUB)
    async with stub(api.plain_target) as s:
        code, _ = await code_of(
            s.RecordGrant(grant_request(p, level=kw["level"], user=user), metadata=LOWLY)
        )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert (await api.read()).grants == ()
    assert [e.reason for e in api.audit.events] == [slug]


async def test_a_caller_within_its_scope_grants_what_it_may(
    api: Api, keys: dict[str, Path]
) -> None:
    p = proof(keys, api, who="lowly", level="elevated", acr="mfa", amr=["otp"])
    async with stub(api.plain_target) as s:
        await s.RecordGrant(grant_request(p, level="elevated"), metadata=LOWLY)
    assert [g.level for g in (await api.read()).grants] == ["elevated"]


@pytest.mark.parametrize(
    ("kw", "proof_kw", "slug"),
    [
        ({"level": "nope"}, {"level": "nope"}, "level-unknown"),
        ({}, {"acr": "mfa"}, "acr-insufficient"),  # high needs phr
        ({}, {"amr": ["otp"]}, "amr-insufficient"),  # high needs hwk or fido
        ({}, {"auth_time": 1}, "auth-too-old"),  # beyond max_age
        ({}, {"auth_time": 2**40}, "auth-time-future"),
        ({"ip": "not-an-ip"}, {}, "argument-invalid"),
        ({"session_id": ""}, {}, "argument-invalid"),
        ({"user": pb.User(issuer=ISS)}, {}, "argument-invalid"),
        ({"device": "x" * 300}, {}, "argument-invalid"),
        ({"ttl_s": -1}, {}, "argument-invalid"),
        ({"proof": "x" * 9000}, {}, "argument-invalid"),
    ],
)
async def test_bad_input_is_invalid_argument_and_changes_nothing(
    api: Api,
    pki: dict[str, Path],
    keys: dict[str, Path],
    kw: dict[str, Any],
    proof_kw: dict[str, Any],
    slug: str,
) -> None:
    request = grant_request(proof(keys, api, **proof_kw), **kw)
    async with stub(api.tls_target, mtls(pki)) as s:
        code, details = await code_of(s.RecordGrant(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details
    assert (await api.read()).grants == ()
    (ev,) = api.audit.events
    assert (ev.type, ev.outcome, ev.reason) == (EventType.STEPUP_COMPLETED, "failure", slug)


async def test_audit_unavailable_means_no_grant(
    api: Api, pki: dict[str, Path], keys: dict[str, Path]
) -> None:
    api.audit.fail = True
    async with stub(api.tls_target, mtls(pki)) as s:
        code, _ = await code_of(s.RecordGrant(grant_request(proof(keys, api))))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert (await api.read()).grants == ()


# --- who is calling ---------------------------------------------------------------------------


async def test_unauthenticated_callers(
    api: Api, pki: dict[str, Path], keys: dict[str, Path]
) -> None:
    bad_meta = [
        (),
        (("authorization", "Bearer wrong-secret-0123456789"),),
        (("authorization", HELPDESK_SECRET),),
        (("authorization", f"Basic {HELPDESK_SECRET}"),),
    ]
    p = proof(keys, api)
    async with stub(api.plain_target) as s:
        for meta in bad_meta:
            for call in (
                s.RecordGrant(grant_request(p), metadata=meta),
                s.ListSessions(pb.ListSessionsRequest(user=USER), metadata=meta),
                s.RevokeSession(pb.RevokeSessionRequest(user=USER, session_id=SID), metadata=meta),
                s.RevokeUser(pb.RevokeUserRequest(user=USER), metadata=meta),
            ):
                assert (await code_of(call))[0] == grpc.StatusCode.UNAUTHENTICATED
    # Certificates from the right CA: one not configured, one whose CN names the push
    # service (the CN never identifies anyone).
    for who in ("envoy", "cn-only"):
        async with stub(api.tls_target, mtls(pki, who)) as s:
            code, _ = await code_of(s.RecordGrant(grant_request(p)))
            assert code == grpc.StatusCode.UNAUTHENTICATED
    assert (await api.read()).grants == ()
    assert api.audit.events == []


async def test_each_caller_may_only_do_its_operations(
    api: Api, pki: dict[str, Path], keys: dict[str, Path]
) -> None:
    async with stub(api.plain_target) as s:
        code, _ = await code_of(s.RecordGrant(grant_request(proof(keys, api)), metadata=HELPDESK))
        assert code == grpc.StatusCode.PERMISSION_DENIED  # helpdesk: list and revoke only
        code, _ = await code_of(s.ListSessions(pb.ListSessionsRequest(user=USER), metadata=LOWLY))
        assert code == grpc.StatusCode.PERMISSION_DENIED  # lowly: record-grant only
    async with stub(api.tls_target, mtls(pki)) as s:
        code, _ = await code_of(s.ListSessions(pb.ListSessionsRequest(user=USER)))
        assert code == grpc.StatusCode.PERMISSION_DENIED  # push: no reads


async def test_a_known_callers_refused_calls_are_recorded_with_it_once(
    api: Api, pki: dict[str, Path], keys: dict[str, Path]
) -> None:
    """Sessions API calls are audited with their caller, refused ones too: outside its
    scopes, bad input. (Unauthenticated calls are not: test_unauthenticated_callers.)"""
    async with stub(api.plain_target) as s:
        await code_of(s.RecordGrant(grant_request(proof(keys, api)), metadata=HELPDESK))
        await code_of(s.ListSessions(pb.ListSessionsRequest(user=USER), metadata=LOWLY))
        bad = pb.RevokeSessionRequest(user=USER, session_key="not-a-key")
        await code_of(s.RevokeSession(bad, metadata=HELPDESK))
        await code_of(s.ListSessions(pb.ListSessionsRequest(), metadata=HELPDESK))
    got = [
        (e.type, e.outcome, e.reason, e.user, e.details.get("caller", e.details.get("actor")))
        for e in api.audit.events
    ]
    assert got == [
        (EventType.STEPUP_COMPLETED, "failure", "out-of-scope", f"{ISS}|{SUB}", "helpdesk"),
        (EventType.SESSIONS_LISTED, "failure", "out-of-scope", f"{ISS}|{SUB}", "lowly"),
        (EventType.GRANT_REVOKED, "failure", "argument-invalid", f"{ISS}|{SUB}", "helpdesk"),
        (EventType.SESSIONS_LISTED, "failure", "argument-invalid", None, "helpdesk"),
    ]
    assert (await api.read()).grants == ()


async def test_each_caller_is_rate_limited(api: Api, keys: dict[str, Path]) -> None:
    # lowly: 30 a minute, bursts of 3. The fourth call at once is refused; a time later
    # (the injected clock) it may call again.
    async with stub(api.plain_target) as s:
        codes = []
        for _ in range(4):
            code, _ = await code_of(s.RecordGrant(grant_request(""), metadata=LOWLY))
            codes.append(code)
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert set(codes[:3]) == {grpc.StatusCode.PERMISSION_DENIED}  # no proof: refused
        api.clock.now += 2  # one token per 2 s
        code, _ = await code_of(s.RecordGrant(grant_request(""), metadata=LOWLY))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        # another caller is not held back by lowly's bucket
        await s.ListSessions(pb.ListSessionsRequest(user=USER), metadata=HELPDESK)


async def test_list_and_revoke(api: Api, pki: dict[str, Path], keys: dict[str, Path]) -> None:
    now = api.now
    async with stub(api.tls_target, mtls(pki)) as s:
        await s.RecordGrant(grant_request(proof(keys, api, auth_time=now - 1)))
        p2 = proof(
            keys,
            api,
            session_id="sid-2",
            level="elevated",
            acr="mfa",
            amr=["otp"],
            auth_time=now - 1,
        )
        await s.RecordGrant(
            grant_request(p2, session_id="sid-2", level="elevated", device="", ip="")
        )
    async with stub(api.plain_target) as s:
        listed = await s.ListSessions(pb.ListSessionsRequest(user=USER), metadata=HELPDESK)
        by_key = {x.session_key: x for x in listed.sessions}
        assert set(by_key) == {SK, session_key(ISS, SUB, "sid-2")}
        mine = by_key[SK]
        assert (mine.device, mine.ip, [g.level for g in mine.grants]) == (
            "yubi-1",
            "192.0.2.10",
            ["high"],
        )
        r = await s.RevokeSession(
            pb.RevokeSessionRequest(user=USER, session_key=SK, reason="lost token"),
            metadata=HELPDESK,
        )
        assert (r.known, r.session_key) == (True, SK)
        state = await api.read()
        assert (state.session_revoked, state.grants) == (True, ())
        code, _ = await code_of(
            s.RevokeSession(
                pb.RevokeSessionRequest(user=USER, session_key="not-a-key"), metadata=HELPDESK
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        u = await s.RevokeUser(pb.RevokeUserRequest(user=USER), metadata=HELPDESK)
        assert u.sessions == 1 and u.revoked_before == now
        other = await api.read(session=session_key(ISS, SUB, "sid-2"))
        assert other.grants == () and other.revoked_before == u.revoked_before
    listed_events = [e.to_record() for e in api.audit.events if e.type is EventType.SESSIONS_LISTED]
    assert [(r["user"], r["caller"], r["count"]) for r in listed_events] == [
        (f"{ISS}|{SUB}", "helpdesk", 2)
    ]
    revoked = [e.to_record() for e in api.audit.events if e.type is EventType.GRANT_REVOKED]
    assert [
        (r["outcome"], r["session"], r["reason"], r.get("revoked"), r["actor"]) for r in revoked
    ] == [
        ("revoked", SK, "lost token", 1, "helpdesk"),
        ("failure", None, "argument-invalid", 0, "helpdesk"),  # the session key "not-a-key"
        ("revoked", "*", "api-revoke-user", 1, "helpdesk"),
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


async def test_cli(api: Api, pki: dict[str, Path], keys: dict[str, Path], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(LOWLY_SECRET + "\n")
    user = ["--user", ISS, SUB]
    lowly = ["--target", api.plain_target, "--token-file", str(token)]

    # A factor service signs a proof with its key (offline), then records the grant.
    rc, _, _ = await cli("sessions", "jwks", "--key", str(keys["lowly"]), "--kid", "lowly-1")
    assert rc == 0
    signed = await asyncio.to_thread(
        _run_cli,
        [
            "sessions",
            "proof",
            "--key",
            str(keys["lowly"]),
            "--kid",
            "lowly-1",
            "--issuer",
            "lowly",
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
            str(api.now),
        ],
    )
    assert signed[0] == 0
    proof_file = tmp_path / "proof.jwt"
    proof_file.write_text(signed[1])
    rc, out, _ = await cli(
        "sessions",
        "grant",
        *lowly,
        *user,
        "--session",
        SID,
        "--level",
        "elevated",
        "--proof-file",
        str(proof_file),
        "--device",
        "laptop",
    )
    assert rc == 0 and out["session_key"] == SK and out["expires_at"] == api.now + 900
    # The same proof a second time: refused.
    rc, out, err = await cli(
        "sessions",
        "grant",
        *lowly,
        *user,
        "--session",
        SID,
        "--level",
        "elevated",
        "--proof-file",
        str(proof_file),
    )
    assert (rc, json.loads(err)["error"]) == (1, "PERMISSION_DENIED")

    helpdesk = tmp_path / "helpdesk-token"
    helpdesk.write_text(HELPDESK_SECRET)
    reader = ["--target", api.plain_target, "--token-file", str(helpdesk)]
    rc, out, _ = await cli("sessions", "list", *reader, *user)
    assert rc == 0
    (sess,) = out["sessions"]
    assert (sess["session_key"], sess["device"], sess["grants"][0]["level"]) == (
        SK,
        "laptop",
        "elevated",
    )
    push = [
        "--target",
        api.tls_target,
        "--ca",
        str(pki["ca"]),
        "--cert",
        str(pki["push"]),
        "--key",
        str(pki["push-key"]),
    ]
    rc, out, _ = await cli("sessions", "revoke", *push, *user, "--session", SID)
    assert (rc, out) == (0, {"known": True, "session_key": SK})
    assert (await api.read()).session_revoked is True
    rc, out, _ = await cli("sessions", "revoke-user", *reader, *user, "--reason", "offboarded")
    assert rc == 0 and out["sessions"] == 0 and out["revoked_before"] >= api.now

    rc, out, err = await cli("sessions", "list", "--target", api.plain_target, *user)
    assert (rc, out, json.loads(err)["error"]) == (1, None, "UNAUTHENTICATED")
