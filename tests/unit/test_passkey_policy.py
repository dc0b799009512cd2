"""Policy additions for passkeys, the transaction digest, and the pure passkey rules."""

from __future__ import annotations

from typing import Any

import pytest

from authz.core.policy import Policy, load_policy
from authz.core.session import Evidence
from authz.core.transactions import TransactionRequest, request_digest, shown_fields
from authz.errors import PolicyError
from authz.stepup.passkeys import rules
from authz.stepup.passkeys.attestation import PasskeyRefused
from authz.store.credentials import Credential

AAGUID = "2fc0579f-8113-47ea-b116-bb5a8db9202a"


def _policy(**levels: Any) -> Policy:
    return load_policy(
        {
            "levels": {
                "standard": {},
                "elevated": {"acr": ["mfa", "phr"], "max_age": 900},
                **levels,
            },
            "default_level": "standard",
        }
    )


def test_a_level_names_its_factors_and_passkey_rules() -> None:
    p = _policy(
        high={
            "title": "Wire transfers",
            "acr": ["phr"],
            "max_age": 300,
            "factors": ["passkey", "idp"],
            "user_verification": "required",
            "authenticators": {"device_bound": True, "aaguids": [AAGUID.upper()], "mds": True},
        }
    )
    high = p.by_name["high"]
    assert high.factors == ("passkey", "idp") and high.offers("passkey")
    assert high.label == "Wire transfers" and high.user_verification == "required"
    assert high.passkey_acr == "phr"
    assert high.authenticators is not None and high.authenticators.device_bound
    assert high.authenticators.aaguids == frozenset({AAGUID}) and high.authenticators.mds
    assert p.by_name["elevated"].factors == ("idp",)  # the default: unchanged behaviour
    assert rules.stepup_path(high) == "/_stepup/passkey"
    assert rules.stepup_path(p.by_name["elevated"]) == "/_stepup/start"


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"acr": ["phr"], "factors": ["sms"]}, "levels.x.factors"),
        ({"acr": ["phr"], "factors": ["idp", "idp"]}, "levels.x.factors"),
        ({"acr": ["phr"], "user_verification": "required"}, "levels.x.user_verification"),
        (
            {"acr": ["phr"], "factors": ["passkey"], "user_verification": "always"},
            "levels.x.user_verification",
        ),
        (
            {"acr": ["phr"], "factors": ["passkey"], "authenticators": {"aaguids": ["nope"]}},
            "levels.x.authenticators.aaguids.0",
        ),
        (
            {"acr": ["phr"], "factors": ["passkey"], "authenticators": {"synced": True}},
            "levels.x.authenticators.synced",
        ),
        (
            {"acr": ["phr"], "factors": ["passkey", "idp"], "transaction_bound": True},
            "levels.x.factors",
        ),
        (
            {"acr": ["phr"], "factors": ["passkey"], "transaction_bound": {"fields": ["a b"]}},
            "levels.x.transaction_bound.fields",
        ),
        ({"acr": ["mfa", "otp"], "factors": ["passkey"]}, "levels.x.passkey_acr"),
        ({"acr": ["mfa"], "factors": ["passkey"], "passkey_acr": "phr"}, "levels.x.passkey_acr"),
        ({"acr": ["phr"], "title": "two\nlines"}, "levels.x.title"),
    ],
)
def test_bad_passkey_settings_are_refused_with_their_location(
    spec: dict[str, Any], where: str
) -> None:
    with pytest.raises(PolicyError) as err:
        _policy(x=spec)
    assert err.value.location == where


def test_a_transaction_bound_level_and_a_titled_route() -> None:
    p = load_policy(
        {
            "levels": {
                "standard": {},
                "wire": {
                    "acr": ["phr"],
                    "factors": ["passkey"],
                    "transaction_bound": {"fields": ["amount", "payee.name"], "require_body": True},
                },
            },
            "routes": [{"path_prefix": "/wires/", "level": "wire", "title": "Send a wire"}],
            "default_level": "standard",
        }
    )
    tx = p.by_name["wire"].transaction
    assert tx is not None and tx.fields == ("amount", "payee.name") and tx.require_body
    assert tx.ttl_s == 120
    assert p.routes[0].title == "Send a wire"


def test_the_request_digest_tells_every_part_apart() -> None:
    base = request_digest("POST", "bank.example", "/wires/?a=1", b'{"amount":1}')
    others = {
        request_digest("PUT", "bank.example", "/wires/?a=1", b'{"amount":1}'),
        request_digest("POST", "evil.example", "/wires/?a=1", b'{"amount":1}'),
        request_digest("POST", "bank.example", "/wires/?a=2", b'{"amount":1}'),
        request_digest("POST", "bank.example", "/wires/?a=1", b'{"amount":2}'),
        request_digest("POST", "bank.example", "/wires/?a=1", None),
        request_digest("POST", "bank.example", "/wires/?a=1", b""),
    }
    assert base not in others and len(others) == 6
    # Moving bytes between parts does not give the same digest (length prefixes).
    assert request_digest("POST", "a", "/bc", None) != request_digest("POST", "a/", "bc", None)
    assert request_digest("post", "BANK.example", "/x", None) == request_digest(
        "POST", "bank.example", "/x", None
    )
    assert TransactionRequest("POST", "bank.example", "/wires/?a=1", b'{"amount":1}').digest == base


def test_shown_fields_say_what_the_body_does_not() -> None:
    body = (
        b'{"amount": 1250.5, "payee": {"name": "ACME", "iban": ["x"]}, "memo": "'
        + b"m" * 300
        + b'"}'
    )
    shown = dict(shown_fields(body, ("amount", "payee.name", "payee.iban", "missing", "memo")))
    assert shown["amount"] == "1250.5" and shown["payee.name"] == "ACME"
    assert shown["payee.iban"] == "(complex value)" and shown["missing"] == "(not given)"
    assert len(shown["memo"]) == 200
    assert shown_fields(b"not json", ("amount",)) == (("amount", "(not given)"),)
    assert shown_fields(None, ()) == ()


def _cred(created_at: int, *, be: bool = False, aaguid: str = AAGUID) -> Credential:
    return Credential(
        credential_id=b"c" * 16,
        public_key=b"k",
        sign_count=0,
        aaguid=aaguid,
        issuer="i",
        subject="s",
        rp_id="localhost",
        created_at=created_at,
        backup_eligible=be,
    )


def test_a_credential_enrolled_at_or_after_the_stepup_began_cannot_answer_it() -> None:
    level = _policy(high={"acr": ["phr"], "factors": ["passkey"]}).by_name["high"]
    rules.refuse_for_stepup(level, _cred(99), started_at=100)
    for created in (100, 101):
        with pytest.raises(PasskeyRefused) as refused:
            rules.refuse_for_stepup(level, _cred(created), started_at=100)
        assert refused.value.rule == "enrolment.same_stepup"
    assert rules.usable(level, [_cred(99), _cred(100)], 100) == [_cred(99)]


def test_enrolment_needs_fresh_evidence_at_or_above_the_enrolment_level() -> None:
    p = _policy(high={"acr": ["phr"], "max_age": 300})
    now, window = 10_000, 300
    fresh_mfa = Evidence("mfa", ("otp",), now - 10)

    def allowed(*ev: tuple[str | None, Evidence], level: str | None = "elevated") -> bool:
        return rules.enrolment_allowed(p, level, ev, now=now, window_s=window, leeway=0)

    assert allowed((None, fresh_mfa))  # the token itself: a fresh MFA sign-in
    assert allowed(("elevated", fresh_mfa)) and allowed(("high", Evidence("phr", (), now)))
    assert not allowed((None, Evidence("pwd", ("pwd",), now)))  # a password only
    assert not allowed((None, Evidence("mfa", ("otp",), now - window - 1)))  # stale
    assert not allowed(("standard", fresh_mfa))  # a grant below the enrolment level
    assert not allowed((None, fresh_mfa), level=None)  # enrolment not configured
    assert not allowed((None, fresh_mfa), level="standard")  # a level asking for nothing
