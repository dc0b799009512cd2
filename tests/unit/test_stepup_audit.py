"""Every authentication event of the step-up endpoints, exactly once: one audit record per
request, with the precise reason of a refusal, the user when it is known, and the decision
id that the error page shows and that its one JSON log line carries.

Over the shipped fakes (the journey through real Envoy, the dev IdP, Redis and the
exporter is tests/e2e/test_audit_journey.py); the clock is injected."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from authz.audit.events import AuditEvent, EventType
from authz.core.reasons import Reason
from authz.core.session import session_key
from authz.errors import KeysUnavailable, OidcError, TokenError
from authz.ops.logs import JsonFormatter
from tests.builders import ISSUER, StepupEnv, id_token, identity, stepup_env
from tests.unit.test_stepup_endpoints import STATE_COOKIE, TOKEN, callback, cookie_of, start

Client = TestClient[object, object]
ALICE = f"{ISSUER}|alice"
_REFERENCE = re.compile(r"Reference: <code>([0-9A-Z]{26})</code>")


@pytest.fixture
def env(tmp_path: Path) -> StepupEnv:
    e = stepup_env(tmp_path)
    e.tokens.access[TOKEN] = identity()
    return e


@pytest.fixture
async def client(env: StepupEnv) -> AsyncIterator[Client]:
    async with TestClient(TestServer(env.app.build())) as c:
        yield c  # type: ignore[misc]


def flow_events(env: StepupEnv) -> list[AuditEvent]:
    """Every record but the ``stepup.started`` of the set-up's own /start."""
    return [e for e in env.auditor.events if e.type != EventType.STEPUP_STARTED]


async def refused_once(
    resp: object, env: StepupEnv, caplog: pytest.LogCaptureFixture, status: int
) -> AuditEvent:
    """The response is an error page with a reference; exactly one record and one log line
    for it, both with that reference as their decision id."""
    assert resp.status == status  # type: ignore[attr-defined]
    m = _REFERENCE.search(await resp.text())  # type: ignore[attr-defined]
    assert m is not None, "the page shows no reference"
    (event,) = flow_events(env)
    assert event.decision_id == m.group(1)
    lines = [r for r in caplog.records if getattr(r, "decision_id", None) == m.group(1)]
    assert len(lines) == 1
    doc = json.loads(JsonFormatter().format(lines[0]))
    assert (doc["decision_id"], doc["reason"]) == (m.group(1), event.reason)
    return event


Case = Callable[[Client, StepupEnv], Awaitable[object]]


async def _no_state(client: Client, env: StepupEnv) -> object:
    await start(client, env)
    return await client.get("/_stepup/callback", params={"code": "c"}, allow_redirects=False)


async def _forged_state(client: Client, env: StepupEnv) -> object:
    return await callback(client, "made-up", "made-up")


async def _forged_state_no_cookie(client: Client, env: StepupEnv) -> object:
    return await callback(client, "made-up.s1.bogusmac", None)


async def _expired_no_cookie(client: Client, env: StepupEnv) -> object:
    state_id, _ = await start(client, env)
    env.clock.advance(env.settings.stepup.state_ttl_s)  # the browser dropped the cookie too
    return await callback(client, state_id, None)


async def _other_browser(client: Client, env: StepupEnv) -> object:
    state_id, _ = await start(client, env)
    return await callback(client, state_id, "the-attackers-cookie")


async def _expired(client: Client, env: StepupEnv) -> object:
    state_id, cookie = await start(client, env)
    env.clock.advance(env.settings.stepup.state_ttl_s)
    return await callback(client, state_id, cookie)


async def _other_issuer(client: Client, env: StepupEnv) -> object:
    state_id, cookie = await start(client, env)
    return await callback(client, state_id, cookie, iss="https://evil.example")


async def _access_denied(client: Client, env: StepupEnv) -> object:
    state_id, cookie = await start(client, env)
    return await client.get(
        "/_stepup/callback",
        params={"state": state_id, "error": "access_denied", "error_description": "<b>no</b>"},
        headers={"Cookie": f"{STATE_COOKIE}={cookie}"},
        allow_redirects=False,
    )


async def _exchange_fails(client: Client, env: StepupEnv) -> object:
    env.oidc.exchange_error = OidcError(
        "token endpoint: HTTP 400 invalid_grant", reason=Reason.CODE_EXCHANGE_FAILED
    )
    state_id, cookie = await start(client, env)
    return await callback(client, state_id, cookie)


async def _id_token_bad(client: Client, env: StepupEnv) -> object:
    env.tokens.next_id_token = TokenError("signature does not verify")
    state_id, cookie = await start(client, env)
    return await callback(client, state_id, cookie)


async def _keys_gone(client: Client, env: StepupEnv) -> object:
    env.tokens.next_id_token = KeysUnavailable("no JWKS")
    state_id, cookie = await start(client, env)
    return await callback(client, state_id, cookie)


async def _someone_else(client: Client, env: StepupEnv) -> object:
    env.tokens.next_id_token = id_token("mallory")
    state_id, cookie = await start(client, env)
    return await callback(client, state_id, cookie)


async def _weak(client: Client, env: StepupEnv) -> object:
    env.tokens.next_id_token = id_token(acr="pwd", amr=("pwd",))
    state_id, cookie = await start(client, env)
    return await callback(client, state_id, cookie)


@pytest.mark.parametrize(
    ("case", "status", "etype", "reason", "user"),
    [
        (_no_state, 400, EventType.STEPUP_FAILED, "state-missing", None),
        (_forged_state, 400, EventType.STEPUP_FAILED, "state-invalid", None),
        (_forged_state_no_cookie, 400, EventType.STEPUP_FAILED, "state-invalid", None),
        (_other_browser, 400, EventType.STEPUP_FAILED, "cookie-mismatch", None),
        (_expired, 400, EventType.STEPUP_FAILED, "state-expired", None),
        (_expired_no_cookie, 400, EventType.STEPUP_FAILED, "state-expired", None),
        (_other_issuer, 403, EventType.STEPUP_FAILED, "issuer-mismatch", ALICE),
        (_access_denied, 403, EventType.STEPUP_FAILED, "idp-error", ALICE),
        (_exchange_fails, 403, EventType.STEPUP_FAILED, "code-exchange-failed", ALICE),
        (_id_token_bad, 403, EventType.STEPUP_FAILED, "id-token-rejected", ALICE),
        (_keys_gone, 403, EventType.STEPUP_FAILED, "keys-unavailable", ALICE),
        (_someone_else, 403, EventType.STEPUP_FAILED, "subject-mismatch", ALICE),
        (_weak, 403, EventType.STEPUP_FAILED, "acr-insufficient", ALICE),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
async def test_each_callback_refusal_is_one_record_with_its_reason_and_the_pages_id(
    client: Client,
    env: StepupEnv,
    caplog: pytest.LogCaptureFixture,
    case: Case,
    status: int,
    etype: EventType,
    reason: str,
    user: str | None,
) -> None:
    caplog.set_level(logging.INFO, logger="authz.stepup")
    event = await refused_once(await case(client, env), env, caplog, status)
    assert (event.type, event.outcome, event.reason, event.user) == (
        etype,
        "failure",
        reason,
        user,
    )
    assert event.ts_ms == int(env.clock() * 1000)
    assert await _grants(env) == 0


async def test_the_idps_error_code_is_recorded_and_its_free_text_is_not(
    client: Client, env: StepupEnv, caplog: pytest.LogCaptureFixture
) -> None:
    event = await refused_once(await _access_denied(client, env), env, caplog, 403)
    assert event.details["idp_error"] == "access_denied"
    assert "<b>" not in json.dumps(dict(event.details))
    env.auditor.events.clear()
    caplog.clear()
    state_id, cookie = await start(client, env)
    resp = await callback(client, state_id, cookie, error="<script>x</script>")
    event = await refused_once(resp, env, caplog, 403)
    assert event.details["idp_error"] == "(not an error code)"


async def test_someone_else_signing_in_names_both_users(
    client: Client, env: StepupEnv, caplog: pytest.LogCaptureFixture
) -> None:
    event = await refused_once(await _someone_else(client, env), env, caplog, 403)
    assert (event.user, event.details["proved_user"]) == (ALICE, f"{ISSUER}|mallory")
    assert event.session == session_key(ISSUER, "alice", "s1")


async def test_back_and_reload_of_a_completed_callback_are_replays_each_recorded(
    client: Client, env: StepupEnv, caplog: pytest.LogCaptureFixture
) -> None:
    state_id, cookie = await start(client, env)
    done = await callback(client, state_id, cookie)
    assert done.status == 303  # type: ignore[attr-defined]
    (completed,) = flow_events(env)
    assert (completed.type, completed.outcome) == (EventType.STEPUP_COMPLETED, "success")
    env.auditor.events.clear()
    # Reload: the successful callback removed the cookie. Back with a stale cookie: both
    # are the same callback again.
    for presented in (None, cookie):
        caplog.clear()
        event = await refused_once(await callback(client, state_id, presented), env, caplog, 400)
        assert (event.type, event.reason) == (EventType.STEPUP_FAILED, "state-replayed")
        env.auditor.events.clear()
    assert len(env.oidc.exchanged) == 1


async def test_start_records_the_step_up_it_sends_to_the_idp_once(
    client: Client, env: StepupEnv
) -> None:
    await start(client, env, ip="10.0.0.7")
    (event,) = env.auditor.events
    assert (event.type, event.outcome, event.user, event.level) == (
        EventType.STEPUP_STARTED,
        "started",
        ALICE,
        "elevated",
    )
    assert (event.client_ip, event.session) == ("10.0.0.7", session_key(ISSUER, "alice", "s1"))
    assert event.details["acr_values"]


async def test_a_refused_start_is_one_failure_with_the_user(
    client: Client, env: StepupEnv, caplog: pytest.LogCaptureFixture
) -> None:
    resp = await client.get(
        "/_stepup/start",
        params={"level": "elevated", "ctx": "forged"},
        headers={"Cookie": f"__Host-stepup-token={TOKEN}"},
        allow_redirects=False,
    )
    event = await refused_once(resp, env, caplog, 400)
    assert (event.type, event.reason, event.user) == (
        EventType.STEPUP_FAILED,
        "link-invalid",
        ALICE,
    )


async def test_cancel_consumes_the_state_and_is_recorded_once(
    client: Client, env: StepupEnv, caplog: pytest.LogCaptureFixture
) -> None:
    state_id, cookie = await start(client, env)
    env.auditor.events.clear()
    headers = {"Cookie": f"{STATE_COOKIE}={cookie}"}
    resp = await client.get("/_stepup/cancel", headers=headers, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == env.settings.stepup.landing_path
    (event,) = env.auditor.events
    assert (event.type, event.outcome, event.reason, event.user) == (
        EventType.STEPUP_CANCELLED,
        "cancelled",
        "user-cancelled",
        ALICE,
    )
    assert env.completions("elevated", "user-cancelled", "none") == 1
    env.auditor.events.clear()
    # Cancelled is cancelled: a second click records nothing; the IdP's late answer is a
    # replay and makes no grant.
    again = await client.get("/_stepup/cancel", headers=headers, allow_redirects=False)
    assert again.status == 303 and env.auditor.events == []
    event = await refused_once(await callback(client, state_id, cookie), env, caplog, 400)
    assert event.reason == "state-replayed"
    assert env.oidc.exchanged == [] and await _grants(env) == 0


async def test_a_sign_in_is_recorded_completed_with_its_user(
    client: Client, env: StepupEnv
) -> None:
    env.tokens.access["access-token"] = identity()
    resp = await client.get("/_stepup/login", allow_redirects=False)
    state_id = env.oidc.requests[0]["state"]
    resp = await callback(client, state_id, cookie_of(resp, STATE_COOKIE))
    assert resp.status == 303  # type: ignore[attr-defined]
    (event,) = env.auditor.events
    assert (event.type, event.outcome, event.reason, event.user, event.factor) == (
        EventType.LOGIN_COMPLETED,
        "success",
        "success",
        ALICE,
        "pwd",
    )
    assert (event.session, event.client_ip) == (session_key(ISSUER, "alice", "s1"), "10.0.0.7")


async def test_a_sign_in_with_an_opaque_access_token_is_a_failure_logged_and_recorded(
    client: Client, env: StepupEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """The review: an IdP that issues an opaque access token left no log and no record."""
    caplog.set_level(logging.INFO, logger="authz.stepup")
    env.oidc.token_response = {"id_token": "id-token", "access_token": "opaque-2f7c9a"}
    resp = await client.get("/_stepup/login", allow_redirects=False)
    state_id = env.oidc.requests[0]["state"]
    resp = await callback(client, state_id, cookie_of(resp, STATE_COOKIE))
    event = await refused_once(resp, env, caplog, 403)
    assert (event.type, event.outcome, event.reason, event.user) == (
        EventType.LOGIN_COMPLETED,
        "failure",
        "access-token-rejected",
        ALICE,
    )
    assert "opaque-2f7c9a" not in caplog.text and "opaque-2f7c9a" not in str(event)


async def test_a_sign_in_refused_before_the_id_token_is_a_login_failure(
    client: Client, env: StepupEnv, caplog: pytest.LogCaptureFixture
) -> None:
    resp = await client.get("/_stepup/login", allow_redirects=False)
    state_id = env.oidc.requests[0]["state"]
    resp = await callback(client, state_id, cookie_of(resp, STATE_COOKIE), error="login_required")
    event = await refused_once(resp, env, caplog, 403)
    assert (event.type, event.reason, event.details["idp_error"]) == (
        EventType.LOGIN_COMPLETED,
        "idp-error",
        "login_required",
    )
    env.auditor.events.clear()
    caplog.clear()
    # The same sign-in's callback again: the state id says it was a sign-in.
    event = await refused_once(await callback(client, state_id, None), env, caplog, 400)
    assert (event.type, event.reason) == (EventType.LOGIN_COMPLETED, "state-replayed")


async def _grants(env: StepupEnv) -> int:
    from tests.unit.test_stepup_endpoints import grants_of

    return len(await grants_of(env))
