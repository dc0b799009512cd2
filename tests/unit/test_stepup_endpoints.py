"""The step-up endpoints, every outcome, over the shipped fakes (no Redis, no IdP): what an
attacker or an unlucky user sends to /_stepup/{login,start,callback} and what comes back.

The end-to-end tests run the same round trip through real Envoy, Redis and the dev IdP;
these pin each branch, with an injected clock."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp.test_utils import TestClient, TestServer

from authz.audit.events import EventType
from authz.core.session import session_key, user_key
from authz.errors import OidcError, StoreError, TokenError
from authz.stepup.state import StateKind, StepupState
from tests.builders import ISSUER, NOW, StepupEnv, id_token, identity, stepup_env

STATE_COOKIE = "__Host-stepup-state"
DEVICE_COOKIE = "__Host-stepup-device"
TOKEN = "alice-access-token"


@pytest.fixture
def env(tmp_path: Path) -> StepupEnv:
    e = stepup_env(tmp_path)
    e.tokens.access[TOKEN] = identity()
    return e


@pytest.fixture
async def client(env: StepupEnv) -> AsyncIterator[TestClient[object, object]]:
    async with TestClient(TestServer(env.app.build())) as c:
        yield c  # type: ignore[misc]


def cookie_of(resp: object, name: str) -> str | None:
    morsel = resp.cookies.get(name)  # type: ignore[attr-defined]
    return None if morsel is None else str(morsel.value)


async def start(
    client: TestClient[object, object],
    env: StepupEnv,
    level: str = "elevated",
    *,
    rd: str = "/accounts/1",
    token: str | None = TOKEN,
    device: str | None = None,
    ip: str | None = "10.0.0.7",
) -> tuple[str, str]:
    """/start with a valid link; returns (state id from the IdP redirect, state cookie)."""
    headers = {"Cookie": f"__Host-stepup-token={token}"} if token else {}
    resp = await client.get(
        "/_stepup/start",
        params={"level": level, "rd": rd, "ctx": env.link(level, device=device, ip=ip)},
        headers=headers,
        allow_redirects=False,
    )
    assert resp.status == 302, await resp.text()
    query = parse_qs(urlsplit(resp.headers["Location"]).query)
    cookie = cookie_of(resp, STATE_COOKIE)
    assert cookie is not None
    return query["state"][0], cookie


async def callback(
    client: TestClient[object, object],
    state: str,
    cookie: str | None,
    *,
    peer: str | None = "10.0.0.7",
    device_cookie: str | None = None,
    **params: str,
) -> object:
    """The browser comes back from the IdP, through Envoy (which sets the peer header)."""
    query = {"state": state, "code": "the-code", **params}
    cookies = []
    if cookie is not None:
        cookies.append(f"{STATE_COOKIE}={cookie}")
    if device_cookie is not None:
        cookies.append(f"{DEVICE_COOKIE}={device_cookie}")
    headers = {"Cookie": "; ".join(cookies)} if cookies else {}
    if peer is not None:
        headers["x-stepup-peer-address"] = peer
    return await client.get(
        "/_stepup/callback", params=query, headers=headers, allow_redirects=False
    )


async def grants_of(env: StepupEnv, sid: str = "s1") -> tuple[object, ...]:
    state = await env.store.read_check(
        user=user_key(ISSUER, "alice"),
        session=session_key(ISSUER, "alice", sid),
        levels=("elevated", "high"),
        level="elevated",
        device=None,
        ip=None,
        sensitive=False,
        window_s=60,
        now=int(env.clock()),
    )
    return state.grants


# -- login and start -------------------------------------------------------------------


async def test_login_stores_a_state_and_redirects_to_the_idp(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    resp = await client.get("/_stepup/login", params={"rd": "/news"}, allow_redirects=False)
    assert resp.status == 302
    (req,) = env.oidc.requests
    assert req["prompt_login"] is False and req["acr_values"] == ()
    state_id = req["state"].partition(".")[0]  # then the way back, signed
    raw = await env.store.take_state(state_id)
    assert raw is not None
    saved = StepupState.from_json(raw)
    assert saved is not None and saved.kind is StateKind.LOGIN and saved.return_path == "/news"
    assert cookie_of(resp, STATE_COOKIE) == state_id


@pytest.mark.parametrize("rd", ["https://evil.example/", "//evil.example/", "/\\evil", "/%09/x"])
async def test_a_foreign_return_path_becomes_the_landing_page(
    client: TestClient[object, object], env: StepupEnv, rd: str
) -> None:
    await client.get("/_stepup/login", params={"rd": rd}, allow_redirects=False)
    raw = await env.store.take_state(env.oidc.requests[0]["state"].partition(".")[0])
    saved = StepupState.from_json(raw or {})
    assert saved is not None and saved.return_path == "/"


async def test_start_asks_the_idp_for_the_levels_factor(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    state_id, _ = await start(client, env, "elevated", ip="10.0.0.7")
    (req,) = env.oidc.requests
    assert req["acr_values"] == ("mfa", "phr") and req["max_age"] == 900
    assert req["prompt_login"] is True and req["login_hint"] == "alice"
    saved = StepupState.from_json(await env.store.take_state(state_id.partition(".")[0]) or {})
    assert saved is not None
    assert (saved.level, saved.subject, saved.ip, saved.issued_at) == (
        "elevated",
        "alice",
        "10.0.0.7",
        NOW,
    )
    assert saved.session_key == session_key(ISSUER, "alice", "s1")


async def test_start_for_an_unknown_or_evidence_free_level_is_refused(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    for level in ("ultra", "standard"):
        resp = await client.get("/_stepup/start", params={"level": level})
        assert resp.status == 400
        assert "Reference:" in await resp.text()
    assert env.oidc.requests == []


async def test_start_without_a_valid_session_signs_in_first(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    await start(client, env, token="not-a-token")
    assert env.oidc.requests[0]["prompt_login"] is False  # the login kind, not a step-up


@pytest.mark.parametrize("ctx", ["", "garbage", "a.b"])
async def test_start_with_a_forged_or_missing_link_is_refused(
    client: TestClient[object, object], env: StepupEnv, ctx: str
) -> None:
    resp = await client.get(
        "/_stepup/start",
        params={"level": "elevated", "ctx": ctx},
        headers={"Cookie": f"__Host-stepup-token={TOKEN}"},
    )
    assert resp.status == 400 and "expired" in await resp.text()
    assert env.oidc.requests == []


async def test_a_link_for_another_level_is_refused(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    resp = await client.get(
        "/_stepup/start",
        params={"level": "high", "ctx": env.link("elevated")},
        headers={"Cookie": f"__Host-stepup-token={TOKEN}"},
    )
    assert resp.status == 400


async def test_an_expired_link_is_refused(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    ctx = env.link("elevated")
    env.clock.advance(env.settings.stepup.state_ttl_s + 1)
    resp = await client.get(
        "/_stepup/start",
        params={"level": "elevated", "ctx": ctx},
        headers={"Cookie": f"__Host-stepup-token={TOKEN}"},
    )
    assert resp.status == 400


async def test_start_with_the_store_down_is_503(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    env.store.fail = True
    resp = await client.get(
        "/_stepup/start",
        params={"level": "elevated", "ctx": env.link("elevated")},
        headers={"Cookie": f"__Host-stepup-token={TOKEN}"},
    )
    assert resp.status == 503


# -- callback: the state -----------------------------------------------------------------


@pytest.mark.parametrize("cookie", [None, "another-state"])
async def test_a_callback_whose_state_is_not_this_browsers_is_refused(
    client: TestClient[object, object], env: StepupEnv, cookie: str | None
) -> None:
    state_id, _ = await start(client, env)
    resp = await callback(client, state_id, cookie)
    assert resp.status == 400  # type: ignore[attr-defined]
    assert env.oidc.exchanged == []
    assert env.completions("unknown", "state-mismatch", "none") == 1
    assert await grants_of(env) == ()


async def test_a_replayed_callback_is_refused(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    state_id, cookie = await start(client, env)
    first = await callback(client, state_id, cookie)
    assert first.status == 303  # type: ignore[attr-defined]
    again = await callback(client, state_id, cookie)
    assert again.status == 400  # type: ignore[attr-defined]
    assert env.completions("unknown", "state-invalid", "none") == 1
    assert len(env.oidc.exchanged) == 1  # the code is never sent twice


async def test_a_state_past_its_ttl_is_refused(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    state_id, cookie = await start(client, env)
    env.clock.advance(env.settings.stepup.state_ttl_s)
    resp = await callback(client, state_id, cookie)
    assert resp.status == 400  # type: ignore[attr-defined]


async def test_a_state_the_store_cannot_give_back_is_503(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    state_id, cookie = await start(client, env)
    env.store.fail = True
    resp = await callback(client, state_id, cookie)
    assert resp.status == 503  # type: ignore[attr-defined]


async def test_a_stored_value_that_is_not_a_state_is_refused(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    await env.store.put_state("planted", {"kind": "stepup", "rd": "/x"}, 60)
    resp = await callback(client, "planted", "planted")
    assert resp.status == 400  # type: ignore[attr-defined]
    assert env.oidc.exchanged == []


# -- callback: the IdP's answer ------------------------------------------------------------


async def test_an_answer_from_another_issuer_is_refused(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    state_id, cookie = await start(client, env)
    resp = await callback(client, state_id, cookie, iss="https://evil.example")
    assert resp.status == 403  # type: ignore[attr-defined]
    assert env.oidc.exchanged == []
    assert env.completions("elevated", "issuer-mismatch", "none") == 1


async def test_an_idp_error_is_refused_with_a_way_back(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    state_id, cookie = await start(client, env, rd="/accounts/9")
    resp = await client.get(
        "/_stepup/callback",
        params={"state": state_id, "error": "access_denied"},
        headers={"Cookie": f"{STATE_COOKIE}={cookie}"},
    )
    assert resp.status == 403
    body = await resp.text()
    assert 'href="/accounts/9"' in body and "Reference:" in body
    assert env.completions("elevated", "idp-error", "none") == 1


async def test_a_failed_code_exchange_is_refused(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    state_id, cookie = await start(client, env)
    env.oidc.exchange_error = OidcError("boom")
    resp = await callback(client, state_id, cookie)
    assert resp.status == 403  # type: ignore[attr-defined]
    assert env.completions("elevated", "token-rejected", "none") == 1
    assert await grants_of(env) == ()


async def test_the_id_token_is_checked_against_the_states_nonce_and_pkce_is_used(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    state_id, cookie = await start(client, env)
    sent = env.oidc.requests[0]
    env.tokens.next_id_token = TokenError("`nonce` mismatch")
    resp = await callback(client, state_id, cookie)
    assert resp.status == 403  # type: ignore[attr-defined]
    assert env.tokens.nonces == [sent["nonce"]]  # the nonce the authorization request sent
    ((code, verifier),) = env.oidc.exchanged
    digest = hashlib.sha256(verifier.encode()).digest()
    assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == sent["code_challenge"]
    assert code == "the-code"


# -- callback: the grant rule ----------------------------------------------------------------


async def test_a_step_up_records_a_grant_audits_it_first_and_returns(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    state_id, cookie = await start(client, env, rd="/accounts/1", ip="10.0.0.7")
    resp = await callback(client, state_id, cookie)
    assert resp.status == 303  # type: ignore[attr-defined]
    assert resp.headers["Location"] == "/accounts/1"  # type: ignore[attr-defined]
    (grant,) = await grants_of(env)
    assert grant.level == "elevated" and grant.expires_at == NOW + 900  # type: ignore[attr-defined]
    assert grant.ip == "10.0.0.7"  # type: ignore[attr-defined]
    assert cookie_of(resp, "__Host-stepup-device") is not None  # a device cookie for this browser
    (event,) = env.auditor.durable_events
    assert (event.type, event.outcome, event.reason) == (
        EventType.STEPUP_COMPLETED,
        "success",
        "success",
    )
    assert event.device == grant.device  # type: ignore[attr-defined]
    assert env.completions("elevated", "success", "otp") == 1


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (id_token("mallory"), "subject-mismatch"),
        (id_token(issuer="https://other-idp"), "issuer-mismatch"),
        (id_token(acr="pwd", amr=("pwd",)), "acr-insufficient"),
        (id_token(auth_time=None), "auth-time-missing"),
        (id_token(auth_time=NOW + 3600), "auth-time-future"),
        (id_token(auth_time=NOW - 120), "auth-too-old"),  # before the challenge
    ],
)
async def test_a_proof_the_grant_rule_refuses_records_nothing(
    client: TestClient[object, object], env: StepupEnv, token: object, reason: str
) -> None:
    state_id, cookie = await start(client, env)
    env.tokens.next_id_token = token  # type: ignore[assignment]
    resp = await callback(client, state_id, cookie)
    assert resp.status == 403  # type: ignore[attr-defined]
    assert await grants_of(env) == ()
    started, event = env.auditor.events
    assert started.type == EventType.STEPUP_STARTED
    assert (event.type, event.outcome, event.reason) == (EventType.STEPUP_FAILED, "failure", reason)
    assert event.user == f"{ISSUER}|alice"  # whose step-up failed: the session's user
    assert env.auditor.durable_events == []


async def test_no_grant_without_its_durable_audit_record(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    state_id, cookie = await start(client, env)
    env.auditor.fail = True
    resp = await callback(client, state_id, cookie)
    assert resp.status == 503  # type: ignore[attr-defined]
    assert await grants_of(env) == ()
    assert env.completions("elevated", "audit-unavailable", "none") == 1


async def test_a_grant_the_store_cannot_write_is_503(
    client: TestClient[object, object], env: StepupEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_id, cookie = await start(client, env)

    async def down(*args: object, **kw: object) -> None:
        raise StoreError("down")

    monkeypatch.setattr(env.store, "write_grant", down)
    resp = await callback(client, state_id, cookie)
    assert resp.status == 503  # type: ignore[attr-defined]
    assert env.completions("elevated", "store-error", "none") == 1


async def high_grant(env: StepupEnv) -> tuple[object, ...]:
    state = await env.store.read_check(
        user=user_key(ISSUER, "alice"),
        session=session_key(ISSUER, "alice", "s1"),
        levels=("high",),
        level="high",
        device=None,
        ip=None,
        sensitive=False,
        window_s=60,
        now=NOW,
    )
    return state.grants


async def test_a_bound_level_binds_the_grant_to_the_device_and_ip_that_completed_it(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    env.tokens.next_id_token = id_token(acr="phr", amr=("hwk",))
    value, device = env.devices.cookies.issue()  # type: ignore[union-attr]
    state_id, cookie = await start(client, env, "high", device=device, ip="10.0.0.7")
    resp = await callback(client, state_id, cookie, device_cookie=value, peer="10.0.0.7")
    assert resp.status == 303  # type: ignore[attr-defined]
    (grant,) = await high_grant(env)
    assert (grant.device, grant.ip) == (device, "10.0.0.7")  # type: ignore[attr-defined]
    assert cookie_of(resp, DEVICE_COOKIE) is None  # the browser has one of ours already


@pytest.mark.parametrize(
    ("presented", "peer", "reason"),
    [
        ("another", "10.0.0.7", "device-mismatch"),  # the victim's browser, not the link's
        (None, "10.0.0.7", "device-mismatch"),  # no device: a fresh cookie is not the link's
        ("same", "10.9.9.9", "ip-mismatch"),
        ("same", None, "ip-mismatch"),  # Envoy's address missing: not the bound one
    ],
)
async def test_a_bound_step_up_completed_elsewhere_is_refused(
    client: TestClient[object, object],
    env: StepupEnv,
    presented: str | None,
    peer: str | None,
    reason: str,
) -> None:
    """The review's attack: an attacker's link (its device and IP) opened by the victim,
    who completes MFA. The grant would have been bound to the attacker's device."""
    env.tokens.next_id_token = id_token(acr="phr", amr=("hwk",))
    cookies = env.devices.cookies
    assert cookies is not None
    attacker_value, attacker_device = cookies.issue()
    victim_value, _ = cookies.issue()
    state_id, cookie = await start(client, env, "high", device=attacker_device, ip="10.0.0.7")
    device_cookie = {"another": victim_value, "same": attacker_value, None: None}[presented]
    resp = await callback(client, state_id, cookie, device_cookie=device_cookie, peer=peer)
    assert resp.status == 403  # type: ignore[attr-defined]
    assert await high_grant(env) == ()
    (event,) = [e for e in env.auditor.events if e.type == EventType.STEPUP_FAILED]
    assert (event.outcome, event.reason) == ("failure", reason)


async def test_a_link_for_another_session_is_refused_at_start(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    resp = await client.get(
        "/_stepup/start",
        params={"level": "elevated", "ctx": env.link("elevated", sid="the-attackers-sid")},
        headers={"Cookie": f"__Host-stepup-token={TOKEN}"},
    )
    assert resp.status == 403
    assert env.oidc.requests == []
    assert env.completions("elevated", "link-other-session", "none") == 1


async def test_a_link_works_once(client: TestClient[object, object], env: StepupEnv) -> None:
    ctx = env.link("elevated", nonce="n-1")
    headers = {"Cookie": f"__Host-stepup-token={TOKEN}"}
    params = {"level": "elevated", "ctx": ctx}
    first = await client.get(
        "/_stepup/start", params=params, headers=headers, allow_redirects=False
    )
    assert first.status == 302
    again = await client.get(
        "/_stepup/start", params=params, headers=headers, allow_redirects=False
    )
    assert again.status == 400 and "once" in await again.text()
    assert len(env.oidc.requests) == 1


@pytest.mark.parametrize(
    "planted", ["A" * 32, "d1.xxxxxxxxxxxxxxxxxxxxxxxx.yyyyyyyyyyyyyyyyyyyyyyyy"]
)
async def test_a_planted_device_cookie_is_no_device(
    client: TestClient[object, object], env: StepupEnv, planted: str
) -> None:
    """The review's fixation: a value the client picked became the victim's bound device.
    Now a value without our MAC is no device: the browser gets a cookie of ours."""
    state_id, cookie = await start(client, env)
    resp = await callback(client, state_id, cookie, device_cookie=planted)
    assert resp.status == 303  # type: ignore[attr-defined]
    issued = cookie_of(resp, DEVICE_COOKIE)
    assert issued is not None and issued != planted
    (grant,) = await grants_of(env)
    assert grant.device == env.devices.cookies.device_id(issued)  # type: ignore[attr-defined, union-attr]


async def test_a_first_sign_in_sets_the_token_cookie(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    env.tokens.access["access-token"] = identity(expires_at=NOW + 600)
    resp = await client.get("/_stepup/login", params={"rd": "/news"}, allow_redirects=False)
    state_id = env.oidc.requests[0]["state"]
    resp = await callback(client, state_id, cookie_of(resp, STATE_COOKIE))
    assert resp.status == 303  # type: ignore[attr-defined]
    assert resp.headers["Location"] == "/news"  # type: ignore[attr-defined]
    assert cookie_of(resp, "__Host-stepup-token") == "access-token"
    assert resp.cookies["__Host-stepup-token"]["max-age"] == "600"  # type: ignore[attr-defined]
    assert env.completions("login", "success", "pwd") == 1


async def test_a_sign_in_whose_access_token_is_not_acceptable_is_refused(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    resp = await client.get("/_stepup/login", allow_redirects=False)
    state_id = env.oidc.requests[0]["state"]
    resp = await callback(client, state_id, cookie_of(resp, STATE_COOKIE))
    assert resp.status == 403  # type: ignore[attr-defined]
    assert cookie_of(resp, "__Host-stepup-token") is None
    assert env.completions("login", "token-rejected", "none") == 1


async def test_a_callback_without_iss_is_refused_when_the_idp_always_sends_it(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    """RFC 9207: the review found a callback without `iss` accepted although the IdP
    advertises authorization_response_iss_parameter_supported."""
    env.oidc.requires_iss = True
    state_id, cookie = await start(client, env)
    resp = await callback(client, state_id, cookie)
    assert resp.status == 403  # type: ignore[attr-defined]
    assert env.oidc.exchanged == []
    assert env.completions("elevated", "iss-missing", "none") == 1
    state_id, cookie = await start(client, env)
    resp = await callback(client, state_id, cookie, iss=ISSUER)
    assert resp.status == 303  # type: ignore[attr-defined]
