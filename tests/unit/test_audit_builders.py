"""The authentication-event builders (authz/audit/mapping.py) the step-up flow, the logout
paths, passkeys and the Sessions API call: every record names the user, the UTC time, the
factor, the outcome and the reason, and encodes as one canonical line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from authz.audit import mapping as m
from authz.audit.events import AuditEvent, EventType, decode_record, encode_event
from authz.core.reasons import Reason

USER = "https://idp.example|alice"
T = 1_733_011_200_000

BUILDERS: list[tuple[Callable[..., AuditEvent], dict[str, Any], EventType, str, str]] = [
    (
        m.login_completed,
        {"user": USER, "amr": ["pwd"]},
        EventType.LOGIN_COMPLETED,
        "success",
        "success",
    ),
    (
        m.login_completed,
        {"failure": "idp-error", "user": None, "idp_error": "access_denied"},
        EventType.LOGIN_COMPLETED,
        "failure",
        "idp-error",
    ),
    (
        m.stepup_started,
        {"level": "elevated", "user": USER, "session": "s", "acr_values": ["mfa"], "max_age": 900},
        EventType.STEPUP_STARTED,
        "started",
        "redirected-to-idp",
    ),
    (
        m.stepup_failed,
        {"reason": Reason.STATE_REPLAYED, "level": "elevated", "user": None},
        EventType.STEPUP_FAILED,
        "failure",
        "state-replayed",
    ),
    (
        m.stepup_failed,
        {"reason": "subject-mismatch", "level": "high", "user": USER, "amr": ["otp", "pwd"]},
        EventType.STEPUP_FAILED,
        "failure",
        "subject-mismatch",
    ),
    (
        m.stepup_cancelled,
        {"level": "elevated", "user": USER},
        EventType.STEPUP_CANCELLED,
        "cancelled",
        "user-cancelled",
    ),
    (
        m.logout,
        {"via": "back-channel", "user": USER, "session": "s", "grants_ended": 2},
        EventType.LOGOUT,
        "success",
        "success",
    ),
    (
        m.grant_recorded,
        {"caller": "push-svc", "user": USER, "session": "s", "level": "high", "amr": ["hwk"]},
        EventType.GRANT_RECORDED,
        "success",
        "success",
    ),
    (
        m.grant_revoked_by,
        {"caller": "ops-cli", "user": USER, "session": "s", "levels": ("high",), "revoked": 1},
        EventType.GRANT_REVOKED,
        "revoked",
        "revoked",
    ),
    (
        m.sessions_listed,
        {"caller": "ops-cli", "user": USER, "count": 3},
        EventType.SESSIONS_LISTED,
        "success",
        "success",
    ),
    (
        m.passkey_enrolled,
        {"user": USER, "credential": "c1"},
        EventType.PASSKEY_ENROLLED,
        "success",
        "success",
    ),
    (
        m.passkey_removed,
        {"user": USER, "credential": "c1", "caller": "ops", "failure": "not-found"},
        EventType.PASSKEY_REMOVED,
        "failure",
        "not-found",
    ),
    (
        m.passkey_ceremony,
        {"ceremony": "authentication", "user": USER, "user_verified": True},
        EventType.PASSKEY_CEREMONY,
        "success",
        "success",
    ),
]


@pytest.mark.parametrize(("build", "kw", "etype", "outcome", "reason"), BUILDERS)
def test_each_builder_names_user_time_factor_outcome_and_reason(
    build: Callable[..., AuditEvent],
    kw: dict[str, Any],
    etype: EventType,
    outcome: str,
    reason: str,
) -> None:
    ev = build(**kw, ts_ms=T)
    rec = decode_record(encode_event(ev))
    assert (rec["type"], rec["outcome"], rec["reason"], rec["ts_ms"]) == (etype, outcome, reason, T)
    assert rec["user"] == kw.get("user")
    assert "factor" in rec and rec["event_id"][:6] == ev.event_id[:6]
    if "amr" in kw:
        assert rec["factor"] == m.factor_of(tuple(kw["amr"])) and rec["amr"] == " ".join(kw["amr"])
    assert not [
        k
        for k, v in rec.items()
        if v is None
        and k
        not in (
            "decision_id",
            "user",
            "session",
            "device",
            "client_ip",
            "route",
            "level",
            "factor",
            "policy_version",
            "reason",
        )
    ]


def test_the_flow_records_carry_what_an_examiner_needs() -> None:
    out = m.logout(via="rp-initiated", user=USER, session="s", ts_ms=T).to_record()
    assert out["via"] == "rp-initiated"
    api = m.grant_recorded(caller="push-svc", user=USER, session="s", level="high", ts_ms=T)
    assert api.to_record()["caller"] == "push-svc"
    start = m.stepup_started(level="high", user=USER, session="s", acr_values=["phr"], ts_ms=T)
    assert (start.details["acr_values"], start.factor) == ("phr", None)  # no factor used yet
    idp = m.login_completed(failure="idp-error", user=None, idp_error="access_denied", ts_ms=T)
    assert idp.details["idp_error"] == "access_denied"


def test_a_policy_reload_names_its_outcome_and_reason() -> None:
    ok = m.policy_reload(result="success", old_sha256="a", new_sha256="b", version="v2")
    bad = m.policy_reload(
        result="error", old_sha256="a", new_sha256=None, version=None, error="line 3: bad"
    )
    assert (ok.outcome, ok.reason, ok.policy_version) == ("success", "success", "v2")
    assert (bad.outcome, bad.reason, bad.details["error"]) == (
        "error",
        "policy-invalid",
        "line 3: bad",
    )
