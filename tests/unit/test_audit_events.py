"""Audit events: canonical encoding, ids, and the Check -> event mapping."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.audit.events import (
    MAX_FIELD_CHARS,
    AuditEvent,
    EventType,
    canonical_bytes,
    encode_event,
    new_event_id,
)
from authz.audit.mapping import (
    allowed_record,
    event_for_check,
    requires_durable,
    stepup_completed,
)
from authz.core.attributes import RequestAttributes
from authz.core.decision import Decision, Outcome
from authz.core.policy import Level
from authz.core.session import Evidence, Grant, Identity

STANDARD = Level("standard", 0, False, frozenset(), frozenset(), None, None)
ELEVATED = Level("elevated", 1, False, frozenset({"mfa"}), frozenset(), 900, None)
HIGH = Level("high", 2, False, frozenset({"phr"}), frozenset(), 300, None)
IDENT = Identity("https://idp.example", "alice", "sid-1", Evidence("pwd", ("pwd",), 100), 9999)


def attrs(path: str = "/accounts/1", query: str = "access_token=SECRET") -> RequestAttributes:
    return RequestAttributes(
        method="GET",
        scheme="https",
        host="trading.example.com",
        path=path,
        query=query,
        headers=MappingProxyType({"authorization": "Bearer SECRET"}),
        source_ip=ipaddress.ip_address("10.1.2.3"),
    )


@pytest.mark.parametrize("char", ["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\t"])
def test_canonical_encoding_escapes_every_control_character(char: str) -> None:
    raw = canonical_bytes({"device": f"a{char}b", "route": "GET h /x"})
    assert raw.count(b"\n") == 0
    assert all(0x20 <= c <= 0x7E for c in raw), raw
    assert json.loads(raw)["device"] == f"a{char}b"  # escaped, not lost


def test_canonical_encoding_is_sorted_compact_and_stable() -> None:
    a = canonical_bytes({"b": 1, "a": "é", "c": None})
    assert a == b'{"a":"\\u00e9","b":1,"c":null}'
    assert canonical_bytes(json.loads(a)) == a


def test_floats_and_objects_are_refused() -> None:
    with pytest.raises(TypeError):
        AuditEvent(EventType.ACCESS_DENIED, details=MappingProxyType({"x": 1.5})).to_record()
    with pytest.raises(ValueError, match="clashes"):
        AuditEvent(EventType.ACCESS_DENIED, details=MappingProxyType({"hash": "x"})).to_record()


def test_long_fields_are_truncated() -> None:
    rec = AuditEvent(EventType.ACCESS_DENIED, route="GET h /" + "a" * 10_000).to_record()
    assert isinstance(rec["route"], str)
    assert len(rec["route"]) == MAX_FIELD_CHARS and rec["route"].endswith("[truncated]")


def test_event_ids_are_ulids_sorted_by_time() -> None:
    a, b = new_event_id(1_000), new_event_id(2_000)
    assert len(a) == 26 and a < b
    assert len({new_event_id(5) for _ in range(1000)}) == 1000


def test_every_record_has_every_common_field() -> None:
    rec = AuditEvent(EventType.POLICY_RELOAD).to_record()
    for name in (
        "event_id",
        "decision_id",
        "ts_ms",
        "user",
        "session",
        "device",
        "client_ip",
        "route",
        "level",
        "outcome",
        "reason",
        "factor",
        "policy_version",
    ):
        assert name in rec
    assert rec["type"] == "policy.reload"


def test_allow_above_the_audit_level_records_the_grant() -> None:
    grant = Grant(
        "elevated", Evidence("mfa", ("pwd", "otp"), 1000), expires_at=1900, issued_at=1001
    )
    d = Decision(
        Outcome.ALLOW,
        "allowed",
        level=ELEVATED,
        identity=IDENT,
        evidence=grant.evidence,
        grant=grant,
    )
    assert requires_durable(d, ELEVATED) and not requires_durable(d, HIGH)
    ev = event_for_check(
        d, "dec-1", attrs(), audit_level=ELEVATED, policy_version="v7", device="dev\n1"
    )
    assert ev is not None
    raw = encode_event(ev)
    assert b"SECRET" not in raw  # neither the query nor the authorization header
    rec = json.loads(raw)
    assert rec["type"] == "access.allowed" and rec["decision_id"] == "dec-1"
    assert rec["route"] == "GET trading.example.com /accounts/1"
    assert rec["user"] == "https://idp.example|alice" and len(rec["session"]) == 40
    assert (rec["grant_level"], rec["acr"], rec["auth_time"], rec["grant_expires_at"]) == (
        "elevated",
        "mfa",
        1000,
        1900,
    )
    assert rec["factor"] == "otp" and rec["device"] == "dev\n1"
    assert event_for_check(d, "d", attrs(), audit_level=HIGH, policy_version=None) is None


@pytest.mark.parametrize(
    ("outcome", "reason", "etype"),
    [
        (Outcome.LOGIN, "no-credentials", "login.required"),
        (Outcome.LOGIN, "token-expired", "token.rejected"),
        (Outcome.STEP_UP, "acr-insufficient", "stepup.challenge"),
        (Outcome.DENY, "ip-blocked", "access.denied"),
        (Outcome.ERROR, "session-store-unavailable", "error.fail_closed"),
    ],
)
def test_non_allow_outcomes_map_to_their_types(outcome: Outcome, reason: str, etype: str) -> None:
    d = Decision(outcome, reason, level=ELEVATED)
    ev = event_for_check(d, "x", attrs(), audit_level=ELEVATED, policy_version="v1")
    assert ev is not None and ev.type == etype and ev.reason == reason


def test_stepup_completed_carries_factor_acr_auth_time_issuer() -> None:
    rec = stepup_completed(
        result="success",
        level="high",
        user="i|s",
        session="k",
        acr="phr",
        amr=["hwk", "pwd"],
        auth_time=5,
        issuer="https://idp",
    ).to_record()
    assert (
        rec["type"],
        rec["result"],
        rec["factor"],
        rec["acr"],
        rec["auth_time"],
        rec["issuer"],
    ) == ("stepup.completed", "success", "hwk", "phr", 5, "https://idp")
    bad = stepup_completed(
        result="acr-insufficient",
        level="high",
        user=None,
        session=None,
        acr="pwd",
        amr=[],
        auth_time=None,
        issuer=None,
    ).to_record()
    assert bad["result"] == "failure" and bad["reason"] == "acr-insufficient"


# -- the Check path's direct encoding of an audited allow ------------------------------------
_TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40
) | st.sampled_from(["", "a\x7fb", "\u2028", '"\\', "x" * (MAX_FIELD_CHARS + 10)])
_NAMES = st.lists(st.text(alphabet="abc-_1\x7f\n", min_size=1, max_size=6), max_size=3)


@st.composite
def _audited_allows(draw: st.DrawFn) -> tuple[Decision, RequestAttributes, str | None]:
    evidence = draw(
        st.none()
        | st.builds(
            Evidence,
            st.none() | _TEXT,
            st.lists(_TEXT, max_size=3).map(tuple),
            st.none() | st.integers(0, 2**40),
        )
    )
    grant = draw(
        st.none()
        | st.builds(
            Grant,
            level=_TEXT,
            evidence=st.just(Evidence("mfa", ("otp",), 1)),
            expires_at=st.integers(0, 2**40),
            issued_at=st.integers(0, 2**40),
        )
    )
    identity = draw(
        st.none()
        | st.builds(
            Identity,
            _TEXT,
            _TEXT,
            _TEXT,
            st.just(Evidence("pwd", ("pwd",), 1)),
            st.integers(0, 2**40),
        )
    )
    signals = frozenset(draw(_NAMES))
    decision = Decision(
        Outcome.ALLOW,
        draw(st.sampled_from(["allowed", "allowed-by-grant"])),
        level=draw(st.sampled_from([ELEVATED, HIGH])),
        identity=identity,
        evidence=evidence,
        grant=grant,
        fired=tuple(draw(_NAMES)),
        shadow=tuple(draw(_NAMES)),
        signals=signals,
        risk=draw(st.integers(0, 100)) if signals else 0,
        device=draw(st.none() | _TEXT),
    )
    ip = draw(st.none() | st.sampled_from(["10.1.2.3", "2001:db8::1"]))
    a = RequestAttributes(
        method="GET",
        scheme="https",
        host=draw(st.sampled_from(["h.example", "h\x7f"])),
        path=draw(_TEXT.map(lambda t: "/" + t)),
        query="",
        headers=MappingProxyType({}),
        source_ip=ipaddress.ip_address(ip) if ip else None,
    )
    return decision, a, draw(st.none() | _TEXT)


@settings(max_examples=400, deadline=None)
@given(_audited_allows(), st.integers(0, 2**47))
def test_allowed_record_is_the_generic_encoding(
    case: tuple[Decision, RequestAttributes, str | None], ts_ms: int
) -> None:
    """The direct encoder writes byte for byte what the event model and the generic
    canonical encoder write: one record format, whichever path built it."""
    decision, a, version = case
    fast = allowed_record(
        decision,
        "d" * 32,
        a,
        policy_version=version,
        ts_ms=ts_ms,
        event_id="01HZZZZZZZZZZZZZZZZZZZZZZZ",
    )
    event = event_for_check(
        decision, "d" * 32, a, audit_level=decision.level, policy_version=version, ts_ms=ts_ms
    )
    assert event is not None
    generic = encode_event(dataclasses.replace(event, event_id="01HZZZZZZZZZZZZZZZZZZZZZZZ"))
    assert fast == generic
    assert fast == canonical_bytes(json.loads(fast))  # and it is canonical


def test_allowed_record_falls_back_for_shapes_it_does_not_template() -> None:
    """A non-int auth_time (never produced by the token verifier) goes through the generic
    encoder, which refuses what the format cannot hold."""
    odd = Decision(
        Outcome.ALLOW,
        "allowed",
        level=HIGH,
        identity=IDENT,
        evidence=Evidence("mfa", ("otp",), True),
    )  # type: ignore[arg-type]
    rec = json.loads(allowed_record(odd, "d1", attrs(), policy_version="v"))
    assert rec["auth_time"] is True and rec["type"] == "access.allowed"
    bad = Decision(
        Outcome.ALLOW,
        "allowed",
        level=HIGH,
        identity=IDENT,
        evidence=Evidence("mfa", ("otp",), 1.5),
    )  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        allowed_record(bad, "d1", attrs(), policy_version="v")


def test_event_ids_use_crockford_digits_and_keep_time_order() -> None:
    ids = [new_event_id(ms) for ms in (0, 1, 2**40, 2**48 - 1)]
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", i) for i in ids)
    assert ids == sorted(ids) and ids[0].startswith("0000000000")
    assert ids[-1].startswith("7ZZZZZZZZZ")
    digits = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    for ms in (0, 1, 1023, 1024, 2**20 - 1, 2**20, 1_795_832_199_918, 2**48 - 1):
        value = 0
        for ch in new_event_id(ms):
            value = value * 32 + digits.index(ch)
        assert value >> 80 == ms  # the time decodes back; the rest is 80 random bits
    assert len({new_event_id(5)[10:] for _ in range(1000)}) == 1000
