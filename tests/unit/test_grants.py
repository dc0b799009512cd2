"""The one grant rule (authz.core.grants): each rule, its refusal reason, its boundary."""

from __future__ import annotations

import dataclasses

import pytest

from authz.core.grants import GrantRefused, Proof, Target, grant_for
from authz.core.policy import load_policy
from authz.core.reasons import Reason
from authz.core.session import Evidence

POLICY = load_policy(
    {
        "levels": {
            "public": {"public": True},
            "standard": {},
            "elevated": {"acr": ["mfa", "phr"], "max_age": 900},
            "high": {"acr": ["phr"], "amr_any": ["hwk"], "max_age": 300, "bind": ["device", "ip"]},
            "long": {"acr": ["mfa"], "grant_ttl": 3600},
        },
        "default_level": "standard",
    }
)
NOW = 1_000_000
ISS, SUB = "https://idp", "alice"
TARGET = Target(ISS, SUB, device="cookie:abc", ip="10.0.0.1")


def proof(**kw: object) -> Proof:
    base: dict[str, object] = {
        "issuer": ISS,
        "subject": SUB,
        "evidence": Evidence("phr", ("pwd", "hwk"), NOW - 10),
        "challenged_at": NOW - 60,
        "device": "cookie:abc",
        "ip": "10.0.0.1",
    }
    base.update(kw)
    return Proof(**base)  # type: ignore[arg-type]


def grant(level: str, p: Proof, target: Target = TARGET, **kw: int) -> object:
    return grant_for(
        POLICY.by_name.get(level), target, p, now=NOW, leeway=30, default_ttl_s=900, **kw
    )


def refusal(level: str, p: Proof, target: Target = TARGET, **kw: int) -> Reason:
    with pytest.raises(GrantRefused) as err:
        grant(level, p, target, **kw)
    return err.value.reason


def test_a_sufficient_proof_becomes_a_grant_until_auth_time_plus_max_age() -> None:
    g = grant_for(
        POLICY.by_name["elevated"], TARGET, proof(), now=NOW, leeway=30, default_ttl_s=900
    )
    assert (g.level, g.expires_at, g.issued_at) == ("elevated", NOW - 10 + 900, NOW)
    assert (g.device, g.ip) == ("cookie:abc", "10.0.0.1")
    assert g.evidence == Evidence("phr", ("pwd", "hwk"), NOW - 10)


def test_grant_ttl_wins_over_max_age_and_the_default_applies_without_either() -> None:
    g = grant_for(
        POLICY.by_name["long"],
        TARGET,
        proof(evidence=Evidence("mfa", (), NOW)),
        now=NOW,
        leeway=0,
        default_ttl_s=900,
    )
    assert g.expires_at == NOW + 3600


def test_the_callers_cap_shortens_the_grant() -> None:
    g = grant_for(
        POLICY.by_name["elevated"],
        TARGET,
        proof(),
        now=NOW,
        leeway=30,
        default_ttl_s=900,
        ttl_cap_s=60,
    )
    assert g.expires_at == NOW - 10 + 60


@pytest.mark.parametrize(
    ("level", "changes", "reason"),
    [
        ("nope", {}, Reason.LEVEL_UNKNOWN),
        ("public", {}, Reason.LEVEL_NOT_GRANTABLE),
        ("standard", {}, Reason.LEVEL_NOT_GRANTABLE),
        ("elevated", {"issuer": "https://other"}, Reason.ISSUER_MISMATCH),
        ("elevated", {"subject": "mallory"}, Reason.SUBJECT_MISMATCH),
        ("elevated", {"evidence": Evidence("mfa", (), None)}, Reason.AUTH_TIME_MISSING),
        ("elevated", {"evidence": Evidence("mfa", (), NOW + 31)}, Reason.AUTH_TIME_FUTURE),
        ("elevated", {"evidence": Evidence("pwd", (), NOW)}, Reason.ACR_INSUFFICIENT),
        ("high", {"evidence": Evidence("phr", ("otp",), NOW)}, Reason.AMR_INSUFFICIENT),
        (
            "elevated",
            {"evidence": Evidence("mfa", (), NOW - 91), "challenged_at": NOW - 60},
            Reason.AUTH_TOO_OLD,
        ),
        (
            "elevated",
            {"evidence": Evidence("mfa", (), NOW - 931), "challenged_at": None},
            Reason.AUTH_TOO_OLD,
        ),
        ("high", {"device": "cookie:other"}, Reason.DEVICE_MISMATCH),
        ("high", {"device": None}, Reason.DEVICE_MISMATCH),
        ("high", {"ip": "10.9.9.9"}, Reason.IP_MISMATCH),
    ],
)
def test_each_rule_refuses_with_its_reason(
    level: str, changes: dict[str, object], reason: Reason
) -> None:
    assert refusal(level, proof(**changes)) is reason


def test_auth_time_at_the_challenge_minus_leeway_is_still_fresh() -> None:
    p = proof(evidence=Evidence("mfa", (), NOW - 90), challenged_at=NOW - 60)
    assert grant("elevated", p) is not None  # 30 s before the challenge: within leeway
    p = proof(evidence=Evidence("mfa", (), NOW + 30))
    assert grant("elevated", p) is not None  # exactly the leeway into the future


def test_a_bound_level_needs_the_challenges_device_and_ip() -> None:
    assert refusal("high", proof(), dataclasses.replace(TARGET, device=None)) is (
        Reason.DEVICE_REQUIRED
    )
    assert refusal("high", proof(), dataclasses.replace(TARGET, ip=None)) is Reason.IP_REQUIRED


def test_an_unbound_level_records_where_the_challenge_was_but_does_not_require_it() -> None:
    g = grant_for(
        POLICY.by_name["elevated"],
        Target(ISS, SUB),
        proof(device=None, ip=None),
        now=NOW,
        leeway=30,
        default_ttl_s=900,
    )
    assert (g.device, g.ip) == (None, None)


def test_a_grant_that_would_already_have_expired_is_refused() -> None:
    p = proof(evidence=Evidence("mfa", (), NOW - 100), challenged_at=None)
    assert refusal("elevated", p, ttl_cap_s=100) is Reason.AUTH_TOO_OLD
    assert grant("elevated", p, ttl_cap_s=101) is not None
