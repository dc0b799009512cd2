"""A user's journey through the real stack yields exactly its authentication records, once
each: real Envoy (the bootstrap `render envoy` makes), the dev IdP, the service, Valkey and
the audit exporter as processes; the records are read back from the exporter's archive.

The journey: two sign-ins; a step-up; Back and reload of its callback and the callback
replayed from another browser; a step-up cancelled with /_stepup/cancel; one the user
declines at the IdP (``access_denied``); one where someone else (bob) signs in; a grant, a
listing and a revocation through the Sessions API; a policy reload. Every error page's
reference is the decision id of one ``stepup.failed`` record and of one service log line.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import jwt
import pyotp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from authz.admin.proofs import public_jwks, sign_proof
from authz.admin.proto.stepup.v1 import sessions_pb2 as pb
from authz.admin.proto.stepup.v1 import sessions_pb2_grpc
from authz.audit.export import read_records
from authz.demo.stack import Stack
from authz.devidp import BOB_TOTP_SECRET
from tests.builders import wait_until
from tests.tlsutil import pem

from .conftest import DEMO_POLICY
from .test_stepup_flow import Browser, api_get, password_token

pytestmark = pytest.mark.e2e

API_SECRET = "journey-e2e-api-secret-0123456789"
ARCHIVE_WAIT_S = 30.0
_REFERENCE = re.compile(r"Reference: <code>([0-9A-Z]{26})</code>")
# The authentication events this journey is about; the Check's own records (challenges,
# allows) and the producer's are counted elsewhere (tests/e2e/test_audit_e2e.py).
AUTH_TYPES = frozenset(
    {
        "login.completed",
        "stepup.started",
        "stepup.completed",
        "stepup.failed",
        "stepup.cancelled",
        "grant.recorded",
        "grant.revoked",
        "sessions.listed",
        "policy.reload",
    }
)
OTHER_TYPES = frozenset(
    {
        "login.required",
        "token.rejected",
        "stepup.challenge",
        "access.allowed",
        "audit.producer_started",
        "audit.producer_heartbeat",
    }
)


@pytest.fixture(scope="module")
def jstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("journey")
    (d / "policy.yaml").write_text(DEMO_POLICY.read_text())
    (d / "api-secret").write_text(API_SECRET)
    key = ec.generate_private_key(ec.SECP256R1())
    (d / "ops.pem").write_bytes(pem(key))
    (d / "ops.jwks").write_text(json.dumps(public_jwks(pem(key), "ops-1")))
    stack = Stack(d / "stack", policy_file=d / "policy.yaml", authz_timeout="1s")
    stack.extra_settings = {
        "api": {
            "enabled": True,
            "callers": [
                {
                    "name": "ops",
                    "bearer_secret_file": str(d / "api-secret"),
                    "operations": ["record-grant", "revoke", "list"],
                    "max_level": "elevated",
                    "issuers": [stack.idp_url],
                    "acr": ["mfa"],
                    "amr": ["otp", "pwd"],
                    "proof": {"issuer": "ops", "jwks_file": str(d / "ops.jwks")},
                }
            ],
        },
        # 2 shared cores: a 50 ms store deadline can pass and fail a step-up closed.
        "redis": {"deadline_ms": 400},
    }
    with stack:
        yield stack


class Journey:
    """What the user saw: the expected records, and each error page's reference."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.expected: Counter[tuple[str, str, str]] = Counter()
        self.pages: dict[str, tuple[str, str]] = {}  # reference -> (type, reason)

    def expect(self, etype: str, outcome: str, reason: str, n: int = 1) -> None:
        self.expected[(etype, outcome, reason)] += n

    async def refused(
        self, b: Browser, url: str, status: int, etype: str, reason: str
    ) -> dict[str, str]:
        got, headers, body = await b.get(url)
        assert got == status, body
        m = _REFERENCE.search(body)
        assert m is not None, body
        self.pages[m.group(1)] = (etype, reason)
        self.expect(etype, "failure", reason)
        return headers


async def to_idp(j: Journey, b: Browser, path: str) -> str:
    """App -> 302 /_stepup/start -> 302 the IdP: the authorize URL (a stepup.started)."""
    status, headers, _ = await b.get(path)
    assert status == 302 and headers["Location"].startswith("/_stepup/start?"), headers
    status, headers, body = await b.get(headers["Location"])
    assert status == 302, body
    j.expect("stepup.started", "started", "redirected-to-idp")
    return headers["Location"]


async def idp_form(b: Browser, authorize: str, **fields: str) -> str:
    """Answer the IdP's form with ``fields``; where the IdP redirects."""
    status, _, page = await b.get(authorize)
    assert status == 200, page
    m = re.search(r'name="request_id" value="([^"]+)"', page)
    assert m is not None, page
    status, headers, page = await b.post(
        authorize.split("?")[0], {"request_id": m.group(1), **fields}
    )
    assert status == 302, page
    return headers["Location"]


async def signed_in(j: Journey, s: aiohttp.ClientSession) -> Browser:
    b = Browser(s, j.stack)
    await b.sign_in("/accounts/1")
    j.expect("login.completed", "success", "success")
    return b


def proof(stack: Stack, token: str) -> str:
    claims = jwt.decode(token, options={"verify_signature": False})
    now = int(time.time())
    return sign_proof(
        (stack.workdir.parent / "ops.pem").read_bytes(),
        issuer="ops",
        audience="stepup-authz-api",
        user_issuer=claims["iss"],
        subject=claims["sub"],
        session_id="api-s",
        level="elevated",
        acr="mfa",
        amr=["otp"],
        auth_time=now,
        kid="ops-1",
        now=now,
    )


async def sessions_api(j: Journey) -> None:
    token = await password_token(j.stack)
    claims = jwt.decode(token, options={"verify_signature": False})
    user = pb.User(issuer=claims["iss"], subject=claims["sub"])
    meta = (("authorization", f"Bearer {API_SECRET}"),)
    async with grpc.aio.insecure_channel(j.stack.api_target) as channel:
        api = sessions_pb2_grpc.SessionsStub(channel)  # type: ignore[no-untyped-call]
        await api.RecordGrant(
            pb.RecordGrantRequest(
                user=user, session_id="api-s", level="elevated", proof=proof(j.stack, token)
            ),
            metadata=meta,
        )
        j.expect("stepup.completed", "success", "success")  # via=api, actor ops
        listed = await api.ListSessions(pb.ListSessionsRequest(user=user), metadata=meta)
        assert listed.sessions
        j.expect("sessions.listed", "success", "success")
        await api.RevokeSession(
            pb.RevokeSessionRequest(user=user, session_id="api-s", reason="journey"),
            metadata=meta,
        )
        j.expect("grant.revoked", "revoked", "journey")


async def journey(stack: Stack) -> Journey:
    j = Journey(stack)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as s1, aiohttp.ClientSession() as other:
        # 1. sign-in and a step-up; then Back, reload, and the callback replayed elsewhere.
        b1 = await signed_in(j, s1)
        authorize = await to_idp(j, b1, "/accounts/1")
        callback = await b1.idp_login(authorize, otp=True)
        status, headers, body = await b1.get(callback)
        assert (status, headers.get("Location")) == (303, "/accounts/1"), body
        j.expect("stepup.completed", "success", "success")
        assert (await b1.get("/accounts/1"))[0] == 200
        await j.refused(b1, callback, 400, "stepup.failed", "state-replayed")  # Back
        await j.refused(b1, callback, 400, "stepup.failed", "state-replayed")  # reload
        await j.refused(Browser(other, stack), callback, 400, "stepup.failed", "state-replayed")

    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s2:
        b2 = await signed_in(j, s2)
        # 2. cancelled: the user leaves the pending step-up with the cancel link.
        authorize = await to_idp(j, b2, "/accounts/2")
        assert (await b2.get(authorize))[0] == 200  # the IdP's form is showing
        status, headers, _ = await b2.get("/_stepup/cancel")
        assert status == 303, headers
        j.expect("stepup.cancelled", "cancelled", "user-cancelled")
        # 3. the user declines at the IdP: access_denied comes back to the callback.
        authorize = await to_idp(j, b2, "/accounts/2")
        callback = await idp_form(b2, authorize, action="cancel")
        assert "error=access_denied" in callback
        await j.refused(b2, callback, 403, "stepup.failed", "idp-error")
        # 4. someone else signs in at the IdP during alice's step-up.
        authorize = await to_idp(j, b2, "/accounts/2")
        callback = await idp_form(
            b2,
            authorize,
            username="bob",
            password="bob-password",
            otp=pyotp.TOTP(BOB_TOTP_SECRET).now(),
        )
        await j.refused(b2, callback, 403, "stepup.failed", "subject-mismatch")
        assert (await b2.get("/accounts/2"))[0] == 302  # still no grant

    # 5. the Sessions API: a grant, a listing, a revocation, each with its caller.
    await sessions_api(j)
    # 6. a policy reload (SIGHUP).
    policy = stack.policy_file
    policy.write_text(policy.read_text().replace("version: demo-1", "version: demo-2"))
    proc = stack.service_proc
    assert proc is not None
    reloads = len(reload_lines(stack))
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(reload_lines(stack)) > reloads, "the policy reload")
    j.expect("policy.reload", "success", "success")
    return j


def reload_lines(stack: Stack) -> list[dict[str, Any]]:
    return [d for d in service_log_lines(stack) if d.get("msg") == "policy reloaded"]


def archived_after(stack: Stack, marker: str) -> list[dict[str, Any]]:
    """The archive once it holds the record of decision ``marker``: the service's records
    reach the archive in the order it wrote them, so everything before it is there too."""
    deadline = time.monotonic() + ARCHIVE_WAIT_S
    while True:
        recs = read_records([stack.audit_dir]) if stack.audit_dir.is_dir() else []
        if any(r.get("decision_id") == marker for r in recs):
            return recs
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the marker was not archived within {ARCHIVE_WAIT_S:.0f}s\n"
                f"{stack.log_path('exporter').read_text()[-2000:]}"
            )
        time.sleep(0.1)


def service_log_lines(stack: Stack) -> list[dict[str, Any]]:
    out = []
    for line in stack.log_path("service").read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


async def test_the_journey_yields_exactly_its_records_once_each(jstack: Stack) -> None:
    j = await journey(jstack)
    # One more Check after the journey: the end marker.
    status, headers, _ = await api_get(jstack, "/accounts/9", "not-a-token")
    assert status == 401
    recs = archived_after(jstack, headers["x-stepup-decision-id"])

    got = Counter((r["type"], r["outcome"], r["reason"]) for r in recs if r["type"] in AUTH_TYPES)
    assert got == j.expected, (got - j.expected, j.expected - got)
    assert {r["type"] for r in recs} - AUTH_TYPES <= OTHER_TYPES

    alice = {r["user"] for r in recs if r["type"] == "login.completed"}
    assert len(alice) == 1 and next(iter(alice)).endswith("|alice")
    (user,) = alice
    for r in recs:
        if r["type"] in {"stepup.started", "stepup.completed", "stepup.cancelled"}:
            assert r["user"] == user, r
        assert isinstance(r["ts_ms"], int)
    (mismatch,) = [r for r in recs if r["reason"] == "subject-mismatch"]
    assert (mismatch["user"], mismatch["proved_user"]) == (user, user[: -len("alice")] + "bob")
    (denied,) = [r for r in recs if r["reason"] == "idp-error"]
    assert (denied["user"], denied["idp_error"]) == (user, "access_denied")
    api = [r for r in recs if r["type"] in {"sessions.listed", "grant.revoked"}]
    assert {r.get("caller") or r.get("actor") for r in api} == {"ops"}
    (api_grant,) = [r for r in recs if r.get("via") == "api"]
    assert (api_grant["actor"], api_grant["user"]) == ("ops", user)

    # Each error page's reference: one stepup.failed record and one service log line.
    logs = service_log_lines(jstack)
    for reference, (etype, reason) in j.pages.items():
        (rec,) = [r for r in recs if r.get("decision_id") == reference]
        assert (rec["type"], rec["reason"]) == (etype, reason)
        (line,) = [d for d in logs if d.get("decision_id") == reference]
        assert (line["msg"], line["reason"]) == ("step-up refused", reason)
