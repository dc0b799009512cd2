"""Context signals and rules: unit tables for every signal, rule condition, their
combinations (shadow included), grant binding and revocation."""

from __future__ import annotations

import ipaddress
from datetime import datetime
from types import MappingProxyType
from zoneinfo import ZoneInfo

import pytest

from authz.core.attributes import RequestAttributes
from authz.core.decision import CheckInputs, Outcome, decide, resolve_level
from authz.core.policy import Context, Policy, load_policy
from authz.core.session import Evidence, Grant, Identity, Sighting, UserState
from authz.core.signals import (
    Device,
    Geo,
    compute_signals,
    device_states,
    impossible_travel,
    km_between,
    off_hours,
    risk_score,
)
from authz.errors import PolicyError

NOW = 1_800_025_200  # 2027-01-15 15:00 UTC, 10:00 in New York, a Friday

DOC = {
    "levels": {
        "standard": {},
        "elevated": {"acr": ["mfa"], "max_age": 900},
        "high": {
            "acr": ["mfa"],
            "max_age": 300,
            "bind": ["device", "ip"],
            "ip_allow": ["10.0.0.0/8", "192.0.2.0/24"],
        },
    },
    "routes": [
        {"path_prefix": "/accounts/", "level": "elevated"},
        {"path_prefix": "/wires/", "level": "high"},
    ],
    "default_level": "standard",
    "signals": {
        "sensitive_level": "elevated",
        "velocity": {"window_s": 60, "max": 20},
        "impossible_travel": {"max_kmh": 900},
        "hours": {"timezone": "America/New_York", "start": "07:00", "end": "19:00"},
    },
    "rules": [
        {"name": "noncompliant", "when": {"device": "noncompliant"}, "deny": "device-noncompliant"},
        {
            "name": "new-device",
            "when": {"signals_any": ["new-device", "no-device"]},
            "raise_to": "elevated",
        },
        {"name": "travel", "when": {"signals_any": ["impossible-travel"]}, "deny": "travel"},
        {"name": "embargo", "when": {"country_in": ["KP"]}, "deny": "country-blocked"},
        {
            "name": "abroad",
            "when": {"country_not_in": ["US", "CA"], "level_at_least": "elevated"},
            "raise_to": "high",
        },
        {
            "name": "fast",
            "when": {"signals_any": ["velocity"]},
            "raise_to": "high",
            "mode": "shadow",
        },
        {
            "name": "night",
            "when": {"signals_all": ["off-hours", "new-ip"]},
            "raise_to": "high",
            "mode": "shadow",
        },
    ],
}


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(DOC)


def attrs(path: str = "/news", ip: str = "10.1.1.1") -> RequestAttributes:
    return RequestAttributes(
        "GET", "https", "app.test", path, "", MappingProxyType({}), ipaddress.ip_address(ip)
    )


def ident(acr: str = "pwd", auth_time: int = NOW - 3600, iat: int = NOW - 60) -> Identity:
    return Identity(
        "https://idp", "alice", "s1", Evidence(acr, ("pwd",), auth_time), NOW + 600, issued_at=iat
    )


KNOWN = UserState(device_known=True, ip_known=True, level_seen=True)
LAPTOP = Device("spiffe://corp/laptop-1", "mtls", managed=True, compliant=True)


def ctx_for(
    policy: Policy,
    device: Device | None,
    state: UserState | None,
    geo: Geo | None = None,
    now: int = NOW,
) -> Context:
    signals = compute_signals(policy.signals, device=device, state=state, geo=geo, now=now)
    return Context(
        device=device_states(device, state), country=geo.country if geo else "US", signals=signals
    )


def inputs(
    state: UserState | None,
    device: Device | None,
    geo: Geo | None = None,
    *,
    identity: Identity | None = None,
) -> CheckInputs:
    """What the service would pass decide(): a signed-in user in the US by default."""
    return CheckInputs(
        NOW, identity=identity or ident(), state=state, device=device, geo=geo or Geo("US")
    )


# -- signals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "state", "expected"),
    [
        (LAPTOP, KNOWN, set()),
        (None, KNOWN, {"no-device"}),
        (LAPTOP, UserState(device_known=False, ip_known=True), {"new-device"}),
        (LAPTOP, UserState(device_known=True, ip_known=False), {"new-ip"}),
        (
            LAPTOP,
            UserState(device_known=True, ip_known=True, level_seen=False),
            {"first-level-access"},
        ),
        (
            Device("d", "assertion", managed=False, compliant=False),
            KNOWN,
            {"device-noncompliant", "device-unmanaged"},
        ),
        # no state (an anonymous request): history signals stay silent
        (LAPTOP, None, set()),
    ],
)
def test_device_ip_level_signals(
    policy: Policy, device: Device | None, state: UserState | None, expected: set[str]
) -> None:
    assert (
        compute_signals(policy.signals, device=device, state=state, geo=None, now=NOW) == expected
    )


@pytest.mark.parametrize(("count", "fires"), [(19, False), (20, False), (21, True)])
def test_velocity_threshold(policy: Policy, count: int, fires: bool) -> None:
    state = UserState(device_known=True, ip_known=True, velocity=count)
    got = compute_signals(policy.signals, device=LAPTOP, state=state, geo=None, now=NOW)
    assert ("velocity" in got) is fires


def test_distance() -> None:
    # New York to London is about 5,570 km
    assert 5500 < km_between(40.71, -74.01, 51.51, -0.13) < 5650


@pytest.mark.parametrize(
    ("elapsed_s", "fires"),
    [
        (3600, True),  # NYC -> London in an hour: impossible
        (8 * 3600, False),  # in eight hours: a flight (~700 km/h)
        (5 * 3600, True),
    ],  # ~1,110 km/h
)
def test_impossible_travel(elapsed_s: int, fires: bool) -> None:
    last = Sighting(NOW - elapsed_s, "203.0.113.1", 40.71, -74.01)
    assert impossible_travel(last, Geo("GB", 51.51, -0.13), NOW, 900) is fires


def test_same_city_is_never_travel() -> None:
    last = Sighting(NOW - 1, "203.0.113.1", 40.71, -74.01)
    assert not impossible_travel(last, Geo("US", 40.75, -73.99), NOW, 900)
    assert not impossible_travel(None, Geo("US", 40.75, -73.99), NOW, 900)
    assert not impossible_travel(last, Geo("US"), NOW, 900)  # no coordinates


def ts(local: str, tz: str = "America/New_York") -> int:
    return int(datetime.fromisoformat(local).replace(tzinfo=ZoneInfo(tz)).timestamp())


@pytest.mark.parametrize(
    ("local", "off"),
    [
        ("2027-01-15 06:59", True),  # Friday before 07:00 in New York
        ("2027-01-15 07:00", False),
        ("2027-01-15 18:59", False),
        ("2027-01-15 19:00", True),
        ("2027-01-16 12:00", True),  # Saturday
        ("2027-07-15 07:30", False),  # summer time: still local 07:30
    ],
)
def test_office_hours_in_the_configured_zone(policy: Policy, local: str, off: bool) -> None:
    assert off_hours(policy.signals, ts(local)) is off


def test_overnight_window_belongs_to_its_start_day() -> None:
    p = load_policy(
        {
            **DOC,
            "signals": {
                "hours": {"timezone": "UTC", "start": "22:00", "end": "06:00", "days": ["mon"]}
            },
        }
    )
    assert off_hours(p.signals, ts("2027-01-18 23:00", "UTC")) is False  # Monday night
    assert off_hours(p.signals, ts("2027-01-19 05:00", "UTC")) is False  # ...until Tuesday 06:00
    assert off_hours(p.signals, ts("2027-01-19 23:00", "UTC")) is True  # Tuesday night


def test_risk_score_weights_and_cap(policy: Policy) -> None:
    assert risk_score(policy.signals, frozenset()) == 0
    assert risk_score(policy.signals, frozenset({"new-device", "new-ip"})) == 50
    worst = frozenset({"impossible-travel", "device-noncompliant"})
    assert risk_score(policy.signals, worst) == 100  # 60 + 50, capped


# -- rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "device", "state", "geo", "outcome", "reason", "level", "fired", "shadow"),
    [
        # a known device on a standard route: nothing fires
        ("/news", LAPTOP, KNOWN, None, Outcome.ALLOW, "allowed", "standard", (), ()),
        # a new device raises standard to elevated (a password token then needs step-up)
        (
            "/news",
            LAPTOP,
            UserState(device_known=False, ip_known=True),
            None,
            Outcome.STEP_UP,
            "acr-insufficient",
            "elevated",
            ("new-device",),
            (),
        ),
        # no device at all: the same rule
        (
            "/news",
            None,
            KNOWN,
            None,
            Outcome.STEP_UP,
            "acr-insufficient",
            "elevated",
            ("new-device",),
            (),
        ),
        # a non-compliant device is denied before anything else
        (
            "/news",
            Device("d", "assertion", compliant=False),
            KNOWN,
            None,
            Outcome.DENY,
            "device-noncompliant",
            "standard",
            ("noncompliant",),
            (),
        ),
        # impossible travel denies
        (
            "/news",
            LAPTOP,
            UserState(
                device_known=True, ip_known=True, last_seen=Sighting(NOW - 600, "x", 40.71, -74.01)
            ),
            Geo("GB", 51.51, -0.13),
            Outcome.DENY,
            "travel",
            "standard",
            ("travel",),
            (),
        ),
        # country rules: an embargoed country is denied, abroad raises elevated to high
        (
            "/news",
            LAPTOP,
            KNOWN,
            Geo("KP"),
            Outcome.DENY,
            "country-blocked",
            "standard",
            ("embargo",),
            (),
        ),
        ("/news", LAPTOP, KNOWN, Geo("FR"), Outcome.ALLOW, "allowed", "standard", (), ()),
        (
            "/accounts/1",
            LAPTOP,
            KNOWN,
            Geo("FR"),
            Outcome.STEP_UP,
            "acr-insufficient",
            "high",
            ("abroad",),
            (),
        ),
        # an unknown country (no GeoIP answer) is treated as abroad: untrusted
        (
            "/accounts/1",
            LAPTOP,
            KNOWN,
            Geo(None),
            Outcome.STEP_UP,
            "acr-insufficient",
            "high",
            ("abroad",),
            (),
        ),
        # velocity matches only a shadow rule: counted, decision unchanged
        (
            "/accounts/1",
            LAPTOP,
            UserState(device_known=True, ip_known=True, velocity=50),
            None,
            Outcome.STEP_UP,
            "acr-insufficient",
            "elevated",
            (),
            ("fast",),
        ),
        # signals_all: both needed for the shadow rule
        (
            "/news",
            LAPTOP,
            UserState(device_known=True, ip_known=False),
            None,
            Outcome.ALLOW,
            "allowed",
            "standard",
            (),
            (),
        ),
    ],
)
def test_rule_table(
    policy: Policy,
    path: str,
    device: Device | None,
    state: UserState | None,
    geo: Geo | None,
    outcome: Outcome,
    reason: str,
    level: str,
    fired: tuple[str, ...],
    shadow: tuple[str, ...],
) -> None:
    d = decide(policy, attrs(path), inputs(state, device, geo))
    assert (d.outcome, d.slug, d.level.name if d.level else None) == (outcome, reason, level)
    assert d.fired == fired
    assert d.shadow == shadow


def test_shadow_rules_never_change_the_decision(policy: Policy) -> None:
    enforced_doc = {
        **DOC,
        "rules": [
            dict(r, mode="enforce") if r.get("mode") == "shadow" else r for r in DOC["rules"]
        ],
    }
    enforced = load_policy(enforced_doc)
    state = UserState(device_known=True, ip_known=True, velocity=50)
    shadowed = decide(policy, attrs("/accounts/1"), inputs(state, LAPTOP))
    live = decide(enforced, attrs("/accounts/1"), inputs(state, LAPTOP))
    assert shadowed.level is not None and shadowed.level.name == "elevated"
    assert live.level is not None and live.level.name == "high"  # it would have raised
    assert shadowed.shadow == ("fast",) and live.fired == ("fast",)


def test_level_ip_allow_list(policy: Policy) -> None:
    ctx = ctx_for(policy, LAPTOP, KNOWN)
    assert resolve_level(policy, attrs("/wires/1", "10.2.2.2"), ctx).deny is None
    assert resolve_level(policy, attrs("/wires/1", "192.0.2.9"), ctx).deny is None
    assert resolve_level(policy, attrs("/wires/1", "203.0.113.5"), ctx).deny == "ip-not-allowed"


# -- grant binding and revocation -----------------------------------------------------------


def bound_grant(device: str | None, ip: str | None) -> Grant:
    return Grant(
        "high", Evidence("mfa", ("otp",), NOW - 10), NOW + 290, NOW - 10, device=device, ip=ip
    )


@pytest.mark.parametrize(
    ("grant_device", "grant_ip", "here_device", "here_ip", "outcome", "reason"),
    [
        ("laptop", "10.1.1.1", "laptop", "10.1.1.1", Outcome.ALLOW, "allowed"),
        ("laptop", "10.1.1.1", "phone", "10.1.1.1", Outcome.STEP_UP, "grant-bound-elsewhere"),
        ("laptop", "10.1.1.1", "laptop", "10.9.9.9", Outcome.STEP_UP, "grant-bound-elsewhere"),
        ("laptop", "10.1.1.1", None, "10.1.1.1", Outcome.STEP_UP, "grant-bound-elsewhere"),
        (None, None, None, "10.1.1.1", Outcome.STEP_UP, "grant-bound-elsewhere"),
    ],
)
def test_bound_grants(
    policy: Policy,
    grant_device: str | None,
    grant_ip: str | None,
    here_device: str | None,
    here_ip: str,
    outcome: Outcome,
    reason: str,
) -> None:
    state = UserState(
        grants=(bound_grant(grant_device, grant_ip),), device_known=True, ip_known=True
    )
    dev = Device(here_device, "cookie") if here_device else None
    d = decide(policy, attrs("/wires/1", here_ip), inputs(state, dev))
    assert (d.outcome, d.slug) == (outcome, reason)


def test_unbound_level_honours_a_grant_from_anywhere(policy: Policy) -> None:
    g = Grant(
        "elevated",
        Evidence("mfa", ("otp",), NOW - 10),
        NOW + 800,
        NOW - 10,
        device="laptop",
        ip="10.1.1.1",
    )
    state = UserState(grants=(g,), device_known=True, ip_known=True)
    d = decide(policy, attrs("/accounts/1", "10.7.7.7"), inputs(state, Device("phone", "cookie")))
    assert d.outcome is Outcome.ALLOW


@pytest.mark.parametrize(
    ("state", "iat", "outcome"),
    [
        (UserState(session_revoked=True), NOW - 60, Outcome.LOGIN),
        (UserState(revoked_before=NOW - 30), NOW - 60, Outcome.LOGIN),  # issued before
        (UserState(revoked_before=NOW - 30), NOW - 30, Outcome.ALLOW),  # issued at/after
        (UserState(revoked_before=NOW - 30), NOW - 10, Outcome.ALLOW),
    ],
)
def test_revocation(policy: Policy, state: UserState, iat: int, outcome: Outcome) -> None:
    d = decide(
        policy, attrs("/news"), inputs(state, Device("x", "cookie"), identity=ident(iat=iat))
    )
    assert d.outcome is outcome
    if outcome is Outcome.LOGIN:
        assert d.reason == "session-revoked"


# -- validation of the new policy parts --------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"rules": [{"when": {"signals_any": ["telepathy"]}, "deny": "x"}]}, "unknown 'telepathy'"),
        ({"rules": [{"when": {"device": "purple"}, "deny": "x"}]}, "unknown 'purple'"),
        ({"rules": [{"when": {"country_in": ["usa"]}, "deny": "x"}]}, "ISO 3166"),
        (
            {"rules": [{"when": {"ip_in": ["10.0.0.0/8"]}, "deny": "x", "mode": "dry"}]},
            "mode is enforce",
        ),
        (
            {"signals": {"hours": {"timezone": "Mars/Olympus", "start": "07:00", "end": "19:00"}}},
            "IANA time zone",
        ),
        ({"signals": {"velocity": {"max": 5}}}, "needs signals.sensitive_level"),
        ({"levels": {"standard": {"bind": ["phase-of-moon"]}}}, "bind is a list of"),
    ],
)
def test_invalid_signal_policies(patch: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        load_policy({**DOC, **patch})
