"""Push step-up (OpenID CIBA) over the shipped fakes, an injected clock and a fake IdP: what
an API client, a second session or a misbehaving IdP sends to /_stepup/ciba, and what
comes back. tests/interop/test_ciba.py runs the same flow against the real oidc-provider,
through real Envoy and the real service."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from authz.audit.events import EventType
from authz.audit.testing import MemoryAuditor
from authz.check.tokens import IdToken
from authz.config.policy_file import PolicyHolder
from authz.config.settings import CibaSettings
from authz.core.session import Evidence, session_key, user_key
from authz.errors import OidcError, TokenError
from authz.ops.metrics import Metrics
from authz.stepup.ciba.backchannel import (
    Acknowledged,
    BackchannelRefused,
    Polled,
    PollResult,
)
from authz.stepup.ciba.flow import CibaFlow
from authz.stepup.ciba.handlers import CibaRoutes
from authz.stepup.ciba.poller import CibaPoller
from authz.stepup.profiles import PROFILES, IdpProfile
from authz.store.ciba import MemoryCibaStore
from authz.store.memory import MemorySessionStore
from tests.builders import ISSUER, NOW, FakeClock, FakeTokens, identity

POLICY = """\
levels:
  public:   {public: true}
  standard: {}
  elevated: {acr: [mfa, phr], max_age: 900}
  high:     {acr: [phr], amr_any: [hwk, fido], max_age: 300}
  bound:    {acr: [mfa, phr], max_age: 600, bind: [ip]}
  keys:     {acr: [phr], max_age: 300, factors: [passkey]}
default_level: standard
routes:
  - {path: /, level: public}
  - {path_prefix: /accounts/, methods: [GET], level: elevated}
  - {path_prefix: /wires/, methods: [POST], level: high}
  - {path_prefix: /vault/, level: bound}
  - {path_prefix: /keys/, level: keys}
"""
TOKEN = "alice-s1"
TOKEN_S2 = "alice-s2"
TOKEN_BOB = "bob-s9"
PEER = "10.0.0.7"
AUTH_REQ_ID = "auth-req-0123456789abcdef"
ACCOUNTS = {"level": "elevated", "method": "GET", "path": "/accounts/1"}


@dataclass
class FakeBackchannel:
    """The IdP: every backchannel request is recorded (``sent``); ``ack`` is the next
    acknowledgement (or the exception to raise); ``answers`` the poll answers, in turn
    (authorization_pending once they run out); ``polls`` the auth_req_ids polled."""

    ack: Acknowledged | Exception = field(default_factory=lambda: Acknowledged(AUTH_REQ_ID, 120, 5))
    answers: list[PollResult] = field(default_factory=list)
    sent: list[dict[str, str]] = field(default_factory=list)
    polls: list[str] = field(default_factory=list)

    async def authenticate(self, params: Mapping[str, str]) -> Acknowledged:
        self.sent.append(dict(params))
        if isinstance(self.ack, Exception):
            raise self.ack
        return self.ack

    async def poll(self, auth_req_id: str) -> PollResult:
        self.polls.append(auth_req_id)
        return self.answers.pop(0) if self.answers else PollResult(Polled.PENDING)


def approval(**over: Any) -> PollResult:
    return PollResult(Polled.TOKENS, tokens={"id_token": "id.token.here", **over})


def backchannel_id_token(
    subject: str = "alice",
    *,
    acr: str | None = "mfa",
    amr: tuple[str, ...] = ("pwd", "otp"),
    auth_time: int | None = NOW + 10,
    **claims: Any,
) -> IdToken:
    body: dict[str, Any] = {"iss": ISSUER, "sub": subject, "acr": acr, "amr": list(amr)}
    if auth_time is not None:
        body["auth_time"] = auth_time
    body.update(claims)
    return IdToken(ISSUER, subject, Evidence(acr, amr, auth_time), None, body)


@dataclass
class FakeIdTokens:
    next: IdToken | Exception = field(default_factory=backchannel_id_token)
    asked: list[str] = field(default_factory=list)

    async def verify_backchannel_id_token(
        self, token: str, now: int, *, auth_req_id: str
    ) -> IdToken:
        self.asked.append(auth_req_id)
        if isinstance(self.next, Exception):
            raise self.next
        return self.next


@dataclass
class Env:
    clock: FakeClock
    flow: CibaFlow
    routes: CibaRoutes
    poller: CibaPoller
    idp: FakeBackchannel
    id_tokens: FakeIdTokens
    tokens: FakeTokens
    requests: MemoryCibaStore
    sessions: MemorySessionStore
    auditor: MemoryAuditor
    metrics: Metrics

    def count(self, outcome: str, reason: str, level: str = "elevated") -> float:
        value = self.metrics.registry.get_sample_value(
            "stepup_authz_ciba_requests_total",
            {"outcome": outcome, "reason": reason, "level": level},
        )
        return value or 0.0

    def events(self, etype: EventType) -> list[Any]:
        return [e for e in self.auditor.events if e.type == etype]

    async def grants(self, sid: str = "s1", subject: str = "alice") -> tuple[Any, ...]:
        state = await self.sessions.read_check(
            user=user_key(ISSUER, subject),
            session=session_key(ISSUER, subject, sid),
            levels=("elevated", "high", "bound"),
            level="elevated",
            device=None,
            ip=None,
            sensitive=False,
            window_s=60,
            now=int(self.clock()),
        )
        return state.grants


def make_env(
    tmp_path: Path,
    *,
    profile: IdpProfile = PROFILES["generic"],
    auditor: MemoryAuditor | None = None,
    **ciba: Any,
) -> Env:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    clock = FakeClock()
    tokens = FakeTokens()
    tokens.access[TOKEN] = identity()
    tokens.access[TOKEN_S2] = identity(sid="s2")
    tokens.access[TOKEN_BOB] = identity("bob", sid="s9")
    idp, id_tokens = FakeBackchannel(), FakeIdTokens()
    requests, sessions = MemoryCibaStore(clock), MemorySessionStore(clock)
    auditor = auditor or MemoryAuditor()
    metrics = Metrics()
    settings = CibaSettings(enabled=True, **ciba)
    flow = CibaFlow(
        settings=settings,
        profile=profile,
        policy=PolicyHolder(policy),
        access_tokens=tokens,
        id_tokens=id_tokens,
        backchannel=idp,
        requests=requests,
        grants=sessions,
        sessions=sessions,
        metrics=metrics,
        auditor=auditor,
        clock=clock,
    )
    poller = CibaPoller(
        flow.poll_if_due,
        max_pending=settings.max_pending,
        max_inflight=4,
        max_expiry_s=settings.max_expiry_s,
        clock=clock,
    )
    flow.schedule, flow.has_room = poller.add, poller.has_room
    routes = CibaRoutes(
        flow, path_prefix="/_stepup", peer_header="x-stepup-peer-address", clock=clock
    )
    return Env(
        clock, flow, routes, poller, idp, id_tokens, tokens, requests, sessions, auditor, metrics
    )


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


async def client_for(env: Env) -> TestClient[Any, Any]:
    app = web.Application()
    env.routes.add_routes(app)
    return TestClient(TestServer(app))


@pytest.fixture
async def client(env: Env) -> AsyncIterator[TestClient[Any, Any]]:
    async with await client_for(env) as c:
        yield c


async def post(
    client: TestClient[Any, Any],
    body: object,
    token: str | None = TOKEN,
    *,
    peer: str | None = PEER,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Any]:
    h = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if peer is not None:
        h["x-stepup-peer-address"] = peer
    resp = await client.post("/_stepup/ciba", data=json.dumps(body), headers=h)
    return resp.status, await resp.json(), resp.headers


async def status(
    client: TestClient[Any, Any], request_id: str, token: str = TOKEN
) -> tuple[int, dict[str, Any], Any]:
    resp = await client.get(
        f"/_stepup/ciba/{request_id}", headers={"Authorization": f"Bearer {token}"}
    )
    return resp.status, await resp.json(), resp.headers


async def started(client: TestClient[Any, Any], body: object = ACCOUNTS, **kw: Any) -> str:
    code, doc, _ = await post(client, body, **kw)
    assert code == 202, doc
    return str(doc["id"])


# -- starting a push: who is asked, and what they see ---------------------------------------


async def test_start_asks_the_tokens_user_for_the_level_and_names_the_action(
    client: TestClient[Any, Any], env: Env
) -> None:
    code, doc, headers = await post(client, ACCOUNTS)
    assert code == 202, doc
    (sent,) = env.idp.sent
    assert sent["login_hint"] == "alice"  # from the verified token
    assert sent["acr_values"] == "mfa phr"
    assert sent["scope"] == "openid"
    assert sent["requested_expiry"] == "120"
    assert re.fullmatch(r"[B-Z2-9]{4}-GET/accounts/1", sent["binding_message"])
    assert doc["binding_message"] == sent["binding_message"]  # the client shows the same code
    assert doc["status"] == "pending" and doc["interval"] == 5 and doc["expires_in"] == 120
    assert headers["Location"] == f"/_stepup/ciba/{doc['id']}" == doc["status_url"]
    assert headers["Retry-After"] == "5"
    (ev,) = env.events(EventType.CIBA_STARTED)
    assert (ev.user, ev.level, ev.route) == (
        f"{ISSUER}|alice",
        "elevated",
        "GET 127.0.0.1 /accounts/1",
    )
    assert ev.client_ip == PEER and ev.details["binding"] is True
    assert AUTH_REQ_ID not in json.dumps(ev.to_record())  # a hash, never the IdP's id
    assert env.count("started", "success") == 1


async def test_the_challenges_acr_values_name_the_level(
    client: TestClient[Any, Any], env: Env
) -> None:
    body = {"acr_values": "phr mfa", "max_age": 900, "method": "GET", "path": "/accounts/7"}
    code, doc, _ = await post(client, body)
    assert code == 202 and doc["level"] == "elevated"
    # Without max_age two levels ask for "mfa phr": the client must say which.
    code, doc, _ = await post(client, {**body, "max_age": None}, token=TOKEN_S2)
    assert (code, doc["reason"]) == (400, "bad-request")
    assert "elevated, bound" in doc["detail"]


@pytest.mark.parametrize("field", ["login_hint", "sub", "login_hint_token", "id_token_hint"])
async def test_the_client_cannot_name_who_is_asked(
    client: TestClient[Any, Any], env: Env, field: str
) -> None:
    code, doc, _ = await post(client, {**ACCOUNTS, field: "bob"})
    assert (code, doc["reason"]) == (400, "bad-request")
    assert field in doc["detail"]
    assert env.idp.sent == []  # nothing reached the IdP


async def test_bobs_token_asks_bob(client: TestClient[Any, Any], env: Env) -> None:
    await started(client, token=TOKEN_BOB)
    assert env.idp.sent[0]["login_hint"] == "bob"


def unsigned_jwt(claims: dict[str, Any]) -> str:
    """A JWT-shaped string: the fake verifier has "verified" it; only its payload is read."""

    def part(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


async def test_login_hint_claim_is_read_from_the_verified_token(tmp_path: Path) -> None:
    env = make_env(tmp_path, login_hint_claim="email")
    with_email = unsigned_jwt({"sub": "alice", "email": "alice@example.com"})
    without = unsigned_jwt({"sub": "alice"})
    env.tokens.access[with_email] = identity()
    env.tokens.access[without] = identity(sid="s3")
    async with await client_for(env) as client:
        await started(client, token=with_email)
        code, doc, _ = await post(client, ACCOUNTS, token=without)
    assert env.idp.sent[0]["login_hint"] == "alice@example.com"
    assert (code, doc["reason"]) == (400, "login-hint-unavailable")
    assert len(env.idp.sent) == 1


@pytest.mark.parametrize(
    ("token", "headers", "reason"),
    [
        (None, {}, "no-credentials"),
        ("not-a-known-token", {}, "token-invalid"),
        # A cookie is never read: a cross-site page must not make a browser start pushes.
        (None, {"Cookie": f"__Host-stepup-token={TOKEN}"}, "no-credentials"),
    ],
)
async def test_a_start_needs_a_valid_bearer_token(
    client: TestClient[Any, Any],
    env: Env,
    token: str | None,
    headers: dict[str, str],
    reason: str,
) -> None:
    code, doc, h = await post(client, ACCOUNTS, token=token, headers=headers)
    assert (code, doc["reason"]) == (401, reason)
    assert h["WWW-Authenticate"].startswith('Bearer realm="stepup-authz"')
    assert env.idp.sent == []


async def test_keys_unavailable_is_503_with_retry_after(
    client: TestClient[Any, Any], env: Env
) -> None:
    from authz.errors import KeysUnavailable

    class Down(FakeTokens):
        async def verify_access_token(self, token: str, now: int) -> Any:
            raise KeysUnavailable("refetch held back", retry_after_s=7)

    env.flow.access_tokens = Down()
    code, doc, h = await post(client, ACCOUNTS)
    assert (code, doc["reason"], h["Retry-After"]) == (503, "keys-unavailable", "7")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({**ACCOUNTS, "level": "nope"}, "level-unknown"),
        ({**ACCOUNTS, "level": "standard"}, "level-not-grantable"),
        ({"level": "keys", "method": "GET", "path": "/keys/1"}, "ciba-not-offered"),
        ({**ACCOUNTS, "path": "/"}, "action-not-covered"),  # a public page standing in
        ({"level": "elevated", "method": "POST", "path": "/wires/1"}, "action-not-covered"),
        ({**ACCOUNTS, "path": "/accounts/%2F..%2Fwires"}, "bad-path"),
        ({**ACCOUNTS, "method": "get"}, "bad-request"),
        ({**ACCOUNTS, "requested_expiry": 0}, "bad-request"),
        ({"method": "GET", "path": "/accounts/1"}, "bad-request"),
        ([ACCOUNTS], "bad-request"),
    ],
)
async def test_what_cannot_be_pushed_is_refused_before_the_idp(
    client: TestClient[Any, Any], env: Env, body: object, reason: str
) -> None:
    code, doc, _ = await post(client, body)
    assert (code, doc["reason"]) == (400, reason), doc
    assert doc["reference"]
    assert env.idp.sent == []
    (ev,) = env.events(EventType.CIBA_FAILED)
    assert (ev.reason, ev.decision_id, ev.user) == (reason, doc["reference"], f"{ISSUER}|alice")


async def test_a_level_raised_by_rules_covers_a_lower_route(
    client: TestClient[Any, Any], env: Env
) -> None:
    # GET /accounts is at "elevated"; a rule (unknown device) may have raised it to "high".
    await started(client, {"level": "high", "method": "GET", "path": "/accounts/1"})
    assert env.idp.sent[0]["acr_values"] == "phr"


async def test_a_bound_level_needs_the_clients_address(
    client: TestClient[Any, Any], env: Env
) -> None:
    body = {"level": "bound", "method": "GET", "path": "/vault/1"}
    code, doc, _ = await post(client, body, peer=None)
    assert (code, doc["reason"]) == (400, "ip-required")


async def test_a_body_that_is_not_json_or_too_large_is_refused(
    client: TestClient[Any, Any], env: Env
) -> None:
    h = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    resp = await client.post("/_stepup/ciba", data=b"{not json", headers=h)
    assert resp.status == 400
    resp = await client.post("/_stepup/ciba", data=b" " * 5000, headers=h)
    assert (resp.status, (await resp.json())["reason"]) == (400, "bad-request")
    resp = await client.post(
        "/_stepup/ciba",
        data="level=elevated",
        headers={**h, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status == 400
    assert env.idp.sent == []


async def test_the_idp_refusing_is_502_and_frees_the_session(
    client: TestClient[Any, Any], env: Env
) -> None:
    env.idp.ack = BackchannelRefused("refused", idp_error="unknown_user_id")
    code, doc, _ = await post(client, ACCOUNTS)
    assert (code, doc["reason"]) == (502, "idp-error")
    (ev,) = env.events(EventType.CIBA_FAILED)
    assert ev.details["idp_error"] == "unknown_user_id"
    env.idp.ack = OidcError("timeout")
    code, doc, _ = await post(client, ACCOUNTS)
    assert (code, doc["reason"]) == (503, "idp-unavailable")
    env.idp.ack = Acknowledged(AUTH_REQ_ID, 60, None)
    code, doc, _ = await post(client, ACCOUNTS)  # the slot was given back each time
    assert code == 202 and doc["interval"] == 5  # CIBA: no interval named means 5 s


async def test_a_store_failure_is_503_and_nothing_is_sent(
    client: TestClient[Any, Any], env: Env
) -> None:
    env.requests.fail = True
    code, doc, _ = await post(client, ACCOUNTS)
    assert (code, doc["reason"]) == (503, "store-error")
    assert env.idp.sent == []


async def test_a_revoked_session_starts_no_push(client: TestClient[Any, Any], env: Env) -> None:
    await env.sessions.revoke_session(
        user_key(ISSUER, "alice"), session_key(ISSUER, "alice", "s1"), NOW
    )
    code, doc, _ = await post(client, ACCOUNTS)
    assert (code, doc["reason"]) == (401, "session-revoked")
    assert env.idp.sent == []


# -- push bombing ----------------------------------------------------------------------------


async def test_one_pending_push_per_session(client: TestClient[Any, Any], env: Env) -> None:
    await started(client)
    code, doc, h = await post(client, ACCOUNTS)
    assert (code, doc["reason"]) == (429, "ciba-pending")
    assert 0 < int(h["Retry-After"]) <= 120
    assert len(env.idp.sent) == 1
    await started(client, token=TOKEN_S2)  # another session of the same user may


async def deny_pending(
    client: TestClient[Any, Any], env: Env, request_id: str, token: str = TOKEN
) -> None:
    env.idp.answers.append(PollResult(Polled.DENIED, error="access_denied"))
    env.clock.advance(5)
    _, doc, _ = await status(client, request_id, token)
    assert doc["status"] == "denied", doc


async def test_starts_per_session_are_counted_in_a_window(
    client: TestClient[Any, Any], env: Env
) -> None:
    for _ in range(3):
        await deny_pending(client, env, await started(client))
    code, doc, h = await post(client, ACCOUNTS)
    assert (code, doc["reason"]) == (429, "rate-limited")
    assert int(h["Retry-After"]) <= 600
    assert len(env.idp.sent) == 3
    env.clock.advance(600)
    await started(client)  # a new window


async def test_starts_per_user_are_counted_across_sessions(tmp_path: Path) -> None:
    env = make_env(tmp_path, max_per_session=2, max_per_user=3)
    for sid in ("s2", "s3", "s4", "s5"):
        env.tokens.access[sid] = identity(sid=sid)
    async with await client_for(env) as client:
        for sid in ("s2", "s3", "s4"):
            await started(client, token=sid)
        code, doc, _ = await post(client, ACCOUNTS, token="s5")
    assert (code, doc["reason"]) == (429, "rate-limited")
    assert len(env.idp.sent) == 3


# -- polling: within the IdP's interval, until one outcome -----------------------------------


async def test_pending_then_approved_records_the_grant_for_that_session(
    client: TestClient[Any, Any], env: Env
) -> None:
    request_id = await started(client)
    code, doc, h = await status(client, request_id)
    assert (code, doc["status"], h["Retry-After"]) == (200, "pending", "5")
    assert env.idp.polls == []  # not due yet: the IdP's interval is 5 s
    env.clock.advance(5)
    code, doc, _ = await status(client, request_id)
    assert doc["status"] == "pending" and env.idp.polls == [AUTH_REQ_ID]
    env.idp.answers.append(approval())
    env.clock.advance(5)
    code, doc, _ = await status(client, request_id)
    assert (doc["status"], doc["reason"]) == ("approved", "success")
    assert env.id_tokens.asked == [AUTH_REQ_ID]
    (grant,) = await env.grants("s1")
    assert (grant.level, grant.evidence.acr, grant.ip) == ("elevated", "mfa", PEER)
    assert grant.expires_at == NOW + 10 + 900  # auth_time + max_age
    assert doc["grant_expires_in"] == grant.expires_at - int(env.clock())
    (ev,) = env.auditor.durable_events  # audit before grant
    assert (
        ev.type == EventType.CIBA_COMPLETED and ev.details["grant_expires_at"] == grant.expires_at
    )
    assert env.count("approved", "success") == 1
    assert await env.grants("s2") == ()  # another session of the same user: nothing


async def test_never_polls_faster_than_the_interval(client: TestClient[Any, Any], env: Env) -> None:
    request_id = await started(client)
    env.clock.advance(5)
    for _ in range(5):
        await status(client, request_id)
    assert len(env.idp.polls) == 1
    env.clock.advance(4.5)
    await status(client, request_id)
    assert len(env.idp.polls) == 1
    env.clock.advance(0.5)
    await status(client, request_id)
    assert len(env.idp.polls) == 2


async def test_slow_down_adds_five_seconds_for_good(client: TestClient[Any, Any], env: Env) -> None:
    request_id = await started(client)
    env.idp.answers.append(PollResult(Polled.SLOW_DOWN, error="slow_down"))
    env.clock.advance(5)
    _, doc, _ = await status(client, request_id)
    assert doc["interval"] == 10
    env.clock.advance(9)
    await status(client, request_id)
    assert len(env.idp.polls) == 1
    env.clock.advance(1)
    _, doc, _ = await status(client, request_id)  # authorization_pending: still 10
    assert len(env.idp.polls) == 2 and doc["interval"] == 10


async def test_an_idp_that_does_not_answer_is_asked_less_often(tmp_path: Path) -> None:
    env = make_env(tmp_path, max_interval_s=15)
    env.idp.answers += [PollResult(Polled.UNAVAILABLE, error="HTTP 503")] * 3
    async with await client_for(env) as client:
        request_id = await started(client)
        waits = []
        for _ in range(3):
            env.clock.advance(20)  # past any wait, within the expiry
            before = len(env.idp.polls)
            _, doc, _ = await status(client, request_id)
            assert len(env.idp.polls) == before + 1 and doc["status"] == "pending"
            record = await env.flow._load(request_id)
            assert record is not None
            waits.append(record.next_poll_at - int(env.clock()))
    assert waits == [10, 15, 15]  # 5 s doubled, up to max_interval_s


@pytest.mark.parametrize(
    ("answer", "status_", "reason", "idp_error"),
    [
        (
            PollResult(Polled.DENIED, error="access_denied"),
            "denied",
            "ciba-denied",
            "access_denied",
        ),
        (
            PollResult(Polled.EXPIRED, error="expired_token"),
            "expired",
            "ciba-expired",
            "expired_token",
        ),
        (PollResult(Polled.REFUSED, error="invalid_grant"), "failed", "idp-error", "invalid_grant"),
    ],
)
async def test_the_idps_final_answers(
    client: TestClient[Any, Any],
    env: Env,
    answer: PollResult,
    status_: str,
    reason: str,
    idp_error: str,
) -> None:
    request_id = await started(client)
    env.idp.answers.append(answer)
    env.clock.advance(5)
    _, doc, _ = await status(client, request_id)
    assert (doc["status"], doc["reason"]) == (status_, reason)
    (ev,) = env.events(EventType.CIBA_FAILED)
    assert (ev.reason, ev.details["idp_error"], ev.route) == (
        reason,
        idp_error,
        "GET 127.0.0.1 /accounts/1",
    )
    assert env.count(status_, reason) == 1
    assert await env.grants() == ()
    env.clock.advance(5)
    await status(client, request_id)
    assert len(env.idp.polls) == 1  # an ended request is never polled again
    await started(client)  # and the session may start another


async def test_expiry_ends_a_request_nobody_approved(
    client: TestClient[Any, Any], env: Env
) -> None:
    request_id = await started(client, {**ACCOUNTS, "requested_expiry": 30})
    assert env.idp.sent[0]["requested_expiry"] == "30"
    env.clock.advance(30)
    _, doc, _ = await status(client, request_id)
    assert (doc["status"], doc["reason"]) == ("expired", "ciba-expired")
    assert env.idp.polls == []  # known expired: the IdP is not asked
    env.clock.advance(300)  # the outcome stays readable for result_ttl_s, then goes
    code, doc, _ = await status(client, request_id)
    assert (code, doc["reason"]) == (404, "ciba-unknown")


async def test_requested_expiry_never_exceeds_max_expiry(
    client: TestClient[Any, Any], env: Env
) -> None:
    env.idp.ack = Acknowledged(AUTH_REQ_ID, 3600, 5)  # an IdP that keeps it for an hour
    _, doc, _ = await post(client, {**ACCOUNTS, "requested_expiry": 9999})
    assert env.idp.sent[0]["requested_expiry"] == "120" and doc["expires_in"] == 120


# -- what the approval proves ----------------------------------------------------------------


async def approve_with(
    client: TestClient[Any, Any], env: Env, token: IdToken | Exception
) -> dict[str, Any]:
    request_id = await started(client)
    env.id_tokens.next = token
    env.idp.answers.append(approval())
    env.clock.advance(5)
    _, doc, _ = await status(client, request_id)
    return doc


@pytest.mark.parametrize(
    ("token", "reason", "error"),
    [
        (backchannel_id_token("bob"), "subject-mismatch", None),
        (backchannel_id_token(acr="pwd", amr=("pwd",)), "acr-insufficient", None),
        (backchannel_id_token(auth_time=NOW - 60), "auth-too-old", None),  # before the start
        (
            backchannel_id_token(auth_time=None),
            "auth-time-missing",
            "the ID token has no auth_time",
        ),
        (
            TokenError("`nonce` in a backchannel ID token"),
            "token-rejected",
            "`nonce` in a backchannel ID token",
        ),
    ],
)
async def test_an_approval_that_proves_too_little_is_no_grant(
    client: TestClient[Any, Any],
    env: Env,
    token: IdToken | Exception,
    reason: str,
    error: str | None,
) -> None:
    doc = await approve_with(client, env, token)
    assert (doc["status"], doc["reason"]) == ("failed", reason)
    assert await env.grants() == ()
    (ev,) = env.events(EventType.CIBA_FAILED)
    assert ev.reason == reason
    if error is not None:
        assert ev.details["error"] == error


async def test_high_needs_the_methods_it_names(client: TestClient[Any, Any], env: Env) -> None:
    body = {"level": "high", "method": "POST", "path": "/wires/1"}
    request_id = await started(client, body)
    env.id_tokens.next = backchannel_id_token(acr="phr", amr=())
    env.idp.answers.append(approval())
    env.clock.advance(5)
    _, doc, _ = await status(client, request_id)
    assert (doc["status"], doc["reason"]) == ("failed", "amr-insufficient")
    (ev,) = env.events(EventType.CIBA_FAILED)
    assert ev.details["error"] == "the ID token has no amr"  # acr was right: say what was missing


async def test_the_profiles_claim_pair_says_who_proved_it(tmp_path: Path) -> None:
    """Okta: the access token's user is its `uid`; the ID token's `sub` must equal it (a
    `uid` claim in the ID token proves nothing)."""
    env = make_env(tmp_path, profile=PROFILES["okta"])
    env.tokens.access[TOKEN] = identity("00u1alice")  # what the verifier read from `uid`
    env.tokens.access[TOKEN_S2] = identity("00u1alice", sid="s2")
    async with await client_for(env) as client:
        doc = await approve_with(client, env, backchannel_id_token("00u1alice"))
        assert doc["status"] == "approved"
        env.idp.ack = Acknowledged(f"{AUTH_REQ_ID}-2", 120, 5)
        request_id = await started(client, token=TOKEN_S2)
        env.id_tokens.next = backchannel_id_token("00u2mallory", uid="00u1alice")
        env.idp.answers.append(approval())
        env.clock.advance(5)
        _, doc, _ = await status(client, request_id, TOKEN_S2)
    assert (doc["status"], doc["reason"]) == ("failed", "subject-mismatch")


async def test_another_session_cannot_read_or_use_the_approval(
    client: TestClient[Any, Any], env: Env
) -> None:
    request_id = await started(client)
    code, doc, _ = await status(client, request_id, TOKEN_S2)
    assert (code, doc["reason"]) == (404, "ciba-unknown")  # not told apart from unknown
    (ev,) = env.events(EventType.CIBA_FAILED)
    assert (ev.reason, ev.session) == ("ciba-other-session", session_key(ISSUER, "alice", "s2"))
    env.clock.advance(5)
    await status(client, request_id, TOKEN_BOB)
    assert env.idp.polls == []  # another session's status call never polls
    env.idp.answers.append(approval())
    _, doc, _ = await status(client, request_id)
    assert doc["status"] == "approved"
    assert len(await env.grants("s1")) == 1
    assert await env.grants("s2") == () and await env.grants("s9", "bob") == ()
    code, _, _ = await status(client, request_id, TOKEN_S2)
    assert code == 404


async def test_request_ids_are_not_guessable_paths(client: TestClient[Any, Any], env: Env) -> None:
    for bad in ("x", "A" * 31, "A" * 33, "A" * 31 + "!", "A" * 31 + "%2E"):
        code, doc, _ = await status(client, bad)
        assert (code, doc["reason"]) == (404, "ciba-unknown")


async def test_one_auth_req_id_earns_one_grant(client: TestClient[Any, Any], env: Env) -> None:
    """An IdP that hands the same auth_req_id (and its tokens) to two requests."""
    first = await started(client)
    env.idp.answers.append(approval())
    env.clock.advance(5)
    assert (await status(client, first))[1]["status"] == "approved"
    second = await started(client, token=TOKEN_S2)
    env.idp.answers.append(approval())
    env.clock.advance(5)
    _, doc, _ = await status(client, second, TOKEN_S2)
    assert (doc["status"], doc["reason"]) == ("failed", "ciba-replayed")
    assert await env.grants("s2") == ()


async def test_one_outcome_per_request(client: TestClient[Any, Any], env: Env) -> None:
    """Another replica ended the request first (it saw it expire): the approval that comes
    back afterwards is not a grant."""
    request_id = await started(client)
    assert await env.requests.once(f"end:{request_id}", 600)
    env.idp.answers.append(approval())
    env.clock.advance(5)
    await status(client, request_id)
    assert await env.grants() == ()
    assert env.auditor.durable_events == []


async def test_no_grant_without_its_durable_audit_record(tmp_path: Path) -> None:
    env = make_env(tmp_path, auditor=MemoryAuditor(fail=True))
    async with await client_for(env) as client:
        doc = await approve_with(client, env, backchannel_id_token())
    assert (doc["status"], doc["reason"]) == ("failed", "audit-unavailable")
    assert await env.grants() == ()


async def test_a_grant_the_store_cannot_write_is_a_failure(
    client: TestClient[Any, Any], env: Env
) -> None:
    request_id = await started(client)
    env.idp.answers.append(approval())
    env.clock.advance(5)
    env.sessions.fail = True
    _, doc, _ = await status(client, request_id)
    assert (doc["status"], doc["reason"]) == ("failed", "store-error")


# -- the poller: one task, polls when due, lets go when a request ends -----------------------


async def test_the_poller_polls_what_it_started_when_due(
    client: TestClient[Any, Any], env: Env
) -> None:
    request_id = await started(client)
    assert env.poller.pending == 1
    assert env.poller.run_due(env.clock()) == NOW + 5
    assert env.idp.polls == []
    env.clock.advance(5)
    env.poller.run_due(env.clock())
    await env.poller.drain()
    assert env.idp.polls == [AUTH_REQ_ID]
    env.idp.answers.append(approval())
    env.clock.advance(5)
    env.poller.run_due(env.clock())
    await env.poller.drain()
    assert env.poller.pending == 0  # ended: let go
    assert len(await env.grants()) == 1
    _, doc, _ = await status(client, request_id)  # the client finds it done
    assert doc["status"] == "approved" and len(env.idp.polls) == 2


async def test_the_poller_gives_up_at_expiry(client: TestClient[Any, Any], env: Env) -> None:
    await started(client, {**ACCOUNTS, "requested_expiry": 12})
    for _ in range(5):
        env.clock.advance(5)
        env.poller.run_due(env.clock())
        await env.poller.drain()
    assert env.poller.pending == 0
    assert len(env.idp.polls) == 2  # at +5 and +10; at +12 it is expired, not polled
    (ev,) = env.events(EventType.CIBA_FAILED)
    assert ev.reason == "ciba-expired"


async def test_a_full_poller_refuses_new_starts(tmp_path: Path) -> None:
    env = make_env(tmp_path, max_pending=1)
    async with await client_for(env) as client:
        await started(client)
        code, doc, _ = await post(client, ACCOUNTS, token=TOKEN_S2)
    assert (code, doc["reason"]) == (503, "idp-unavailable")
    assert len(env.idp.sent) == 1


async def test_the_poller_loop_waits_until_the_next_due_time(env: Env) -> None:
    waited: list[float | None] = []

    async def wait(event: Any, seconds: float | None) -> None:
        waited.append(seconds)
        if len(waited) >= 3:
            raise RuntimeError("stop")
        env.clock.advance(seconds or 0)

    polled: list[str] = []

    async def poll(request_id: str) -> tuple[None, bool]:
        polled.append(request_id)
        return None, True

    poller = CibaPoller(
        poll, max_pending=10, max_inflight=2, max_expiry_s=120, clock=env.clock, wait=wait
    )
    poller.add("r1", NOW + 5)
    with pytest.raises(RuntimeError):
        await poller.run()
    await poller.drain()
    assert waited[:2] == [5, None] and polled == ["r1"]
