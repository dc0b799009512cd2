"""Decision table for the pure core, including max_age and leeway boundaries."""

from __future__ import annotations

import ipaddress
from types import MappingProxyType

import pytest

from authz.core.attributes import RequestAttributes
from authz.core.decision import CheckInputs, Outcome, decide, resolve_level
from authz.core.policy import Policy, load_policy
from authz.core.reasons import Reason
from authz.core.session import Evidence, Grant, Identity, UserState, satisfies

NOW = 1_800_000_000

POLICY_DOC = {
    "levels": {
        "public": {"public": True},
        "standard": {},
        "elevated": {"acr": ["mfa", "phr"], "max_age": 900},
        "high": {"acr": ["phr"], "amr_any": ["hwk", "fido"], "max_age": 300},
    },
    "routes": [
        {"path": "/", "level": "public"},
        {
            "host": "trading.example.com",
            "path_prefix": "/accounts/",
            "methods": ["GET"],
            "level": "elevated",
        },
        {"path_prefix": "/wires/", "methods": ["POST", "PUT"], "level": "high"},
        {"path_regex": "^/clients/[0-9]+$", "level": "elevated"},
        {"host": "*.internal.example.com", "level": "high"},
    ],
    "default_level": "standard",
    "rules": [
        {"name": "blocked", "when": {"ip_in": ["198.51.100.0/24"]}, "deny": "ip-blocked"},
        {
            "name": "offsite",
            "when": {"ip_not_in": ["10.0.0.0/8", "127.0.0.0/8"]},
            "raise_to": "elevated",
        },
    ],
}


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(POLICY_DOC)


def attrs(
    path: str = "/accounts/1",
    *,
    method: str = "GET",
    host: str = "trading.example.com",
    ip: str = "10.1.2.3",
    ctx: dict[str, str] | None = None,
) -> RequestAttributes:
    return RequestAttributes(
        method=method,
        scheme="https",
        host=host,
        path=path,
        query="",
        headers=MappingProxyType({}),
        source_ip=ipaddress.ip_address(ip),
        context_extensions=MappingProxyType(ctx or {}),
    )


def ident(
    acr: str | None = "pwd", amr: tuple[str, ...] = ("pwd",), auth_time: int | None = NOW - 3600
) -> Identity:
    return Identity("https://idp", "alice", "sid-1", Evidence(acr, amr, auth_time), NOW + 600)


def grant(
    acr: str = "mfa",
    auth_time: int = NOW - 60,
    expires_at: int = NOW + 600,
    amr: tuple[str, ...] = ("pwd", "otp"),
) -> Grant:
    return Grant("elevated", Evidence(acr, amr, auth_time), expires_at, auth_time)


@pytest.mark.parametrize(
    ("request_", "identity", "grants", "outcome", "reason", "level"),
    [
        # public level: allowed even without identity
        (attrs("/"), None, (), Outcome.ALLOW, "public", "public"),
        # standard level (default): sign-in needed, any acr
        (attrs("/news"), None, (), Outcome.LOGIN, "no-credentials", "standard"),
        (attrs("/news"), ident(), (), Outcome.ALLOW, "allowed", "standard"),
        # elevated: password token is not enough, grant satisfies
        (attrs(), ident(), (), Outcome.STEP_UP, "acr-insufficient", "elevated"),
        (attrs(), ident(), (grant(),), Outcome.ALLOW, "allowed", "elevated"),
        # the token's own acr/auth_time satisfy: no grant needed
        (attrs(), ident("mfa", ("pwd", "otp"), NOW - 10), (), Outcome.ALLOW, "allowed", "elevated"),
        # the token's mfa is too old -> auth-too-old
        (
            attrs(),
            ident("mfa", ("otp",), NOW - 901),
            (),
            Outcome.STEP_UP,
            "auth-too-old",
            "elevated",
        ),
        # an expired grant is ignored
        (
            attrs(),
            ident(),
            (grant(expires_at=NOW),),
            Outcome.STEP_UP,
            "acr-insufficient",
            "elevated",
        ),
        # a grant with a weaker acr does not satisfy
        (attrs(), ident(), (grant(acr="pwd"),), Outcome.STEP_UP, "acr-insufficient", "elevated"),
        # route's method filter: POST /accounts on trading host is not the GET route
        (attrs(method="POST"), ident(), (), Outcome.ALLOW, "allowed", "standard"),
        # host must match: other host, same path -> default level
        (attrs(host="other.example.com"), ident(), (), Outcome.ALLOW, "allowed", "standard"),
        # high needs phr + hwk/fido amr: mfa grant is not enough
        (
            attrs("/wires/1", method="POST"),
            ident(),
            (grant(),),
            Outcome.STEP_UP,
            "acr-insufficient",
            "high",
        ),
        (
            attrs("/wires/1", method="POST"),
            ident("phr", ("hwk",), NOW - 100),
            (),
            Outcome.ALLOW,
            "allowed",
            "high",
        ),
        (
            attrs("/wires/1", method="POST"),
            ident("phr", ("otp",), NOW - 100),
            (),
            Outcome.STEP_UP,
            "acr-insufficient",
            "high",
        ),
        # regex route
        (attrs("/clients/42"), ident(), (), Outcome.STEP_UP, "acr-insufficient", "elevated"),
        (attrs("/clients/42/x"), ident(), (), Outcome.ALLOW, "allowed", "standard"),
        # wildcard host
        (
            attrs("/x", host="db.internal.example.com"),
            ident(),
            (),
            Outcome.STEP_UP,
            "acr-insufficient",
            "high",
        ),
        (
            attrs("/x", host="internal.example.com"),
            ident(),
            (),
            Outcome.ALLOW,
            "allowed",
            "standard",
        ),
        # rules: deny beats everything, raise_to raises
        (attrs("/", ip="198.51.100.7"), ident(), (), Outcome.DENY, "ip-blocked", "public"),
        (
            attrs("/news", ip="203.0.113.5"),
            ident(),
            (),
            Outcome.STEP_UP,
            "acr-insufficient",
            "elevated",
        ),
        # context extensions raise...
        (
            attrs("/news", ctx={"stepup_level": "high"}),
            ident(),
            (),
            Outcome.STEP_UP,
            "acr-insufficient",
            "high",
        ),
        # ...but never lower
        (
            attrs(ctx={"stepup_level": "public"}),
            ident(),
            (),
            Outcome.STEP_UP,
            "acr-insufficient",
            "elevated",
        ),
        # an unknown context level is a deny (configuration drift)
        (attrs(ctx={"stepup_level": "ultra"}), ident(), (), Outcome.DENY, "unknown-level", None),
    ],
)
def test_decision_table(
    policy: Policy,
    request_: RequestAttributes,
    identity: Identity | None,
    grants: tuple[Grant, ...],
    outcome: Outcome,
    reason: str,
    level: str | None,
) -> None:
    d = decide(
        policy, request_, CheckInputs(NOW, identity=identity, state=UserState(grants=grants))
    )
    assert (d.outcome, d.slug) == (outcome, reason)
    assert (d.level.name if d.level else None) == level


def test_allow_reports_the_grant_that_satisfied(policy: Policy) -> None:
    g = grant()
    d = decide(
        policy,
        attrs(),
        CheckInputs(NOW, identity=ident(), state=UserState(grants=(grant(acr="pwd"), g))),
    )
    assert d.outcome is Outcome.ALLOW and d.grant == g and d.evidence == g.evidence


def test_step_up_carries_the_challenge(policy: Policy) -> None:
    d = decide(policy, attrs(), CheckInputs(NOW, identity=ident(), state=UserState()))
    assert d.acr_values == ("mfa", "phr") and d.max_age == 900


def test_token_error_reason_is_kept(policy: Policy) -> None:
    d = decide(policy, attrs(), CheckInputs(NOW, token_error=Reason.TOKEN_EXPIRED))
    assert (d.outcome, d.reason) == (Outcome.LOGIN, "token-expired")


def test_fired_lists_rules_and_context(policy: Policy) -> None:
    r = resolve_level(policy, attrs("/news", ip="203.0.113.5", ctx={"stepup_level": "high"}))
    assert r.fired == ("context:high", "offsite") and r.level is not None
    assert r.level.name == "high"


# --- max_age and leeway boundaries ------------------------------------------------------

MFA = frozenset({"mfa"})


@pytest.mark.parametrize(
    ("age", "leeway", "ok"),
    [
        (899, 0, True),  # now - 1 s before the limit
        (900, 0, True),  # exactly max_age: still fresh (OIDC: elapsed <= max_age)
        (901, 0, False),  # one second past
        (930, 30, True),  # at the edge of the leeway
        (931, 30, False),  # past the leeway
    ],
)
def test_max_age_boundaries(age: int, leeway: int, ok: bool) -> None:
    ev = Evidence("mfa", ("otp",), NOW - age)
    got = satisfies(ev, acr=MFA, amr_any=frozenset(), max_age=900, now=NOW, leeway=leeway)
    assert got is ok


@pytest.mark.parametrize(
    ("skew", "leeway", "ok"),
    [(0, 0, True), (1, 0, False), (30, 30, True), (31, 30, False)],
)
def test_auth_time_in_the_future(skew: int, leeway: int, ok: bool) -> None:
    ev = Evidence("mfa", ("otp",), NOW + skew)
    got = satisfies(ev, acr=MFA, amr_any=frozenset(), max_age=900, now=NOW, leeway=leeway)
    assert got is ok


def test_missing_auth_time_fails_a_max_age_level() -> None:
    ev = Evidence("mfa", ("otp",), None)
    assert not satisfies(ev, acr=MFA, amr_any=frozenset(), max_age=900, now=NOW, leeway=30)
    assert satisfies(ev, acr=MFA, amr_any=frozenset(), max_age=None, now=NOW, leeway=0)


@pytest.mark.parametrize(("expires_at", "live"), [(NOW - 1, False), (NOW, False), (NOW + 1, True)])
def test_grant_expiry_boundary(expires_at: int, live: bool) -> None:
    assert grant(expires_at=expires_at).is_live(NOW) is live
