"""Behavioural and context signals: pure functions of the request, the device, GeoIP and
the user's state as read in the Check's one round trip. Each signal is a slug from
``authz.core.policy.SIGNALS``; rules combine them and the risk score weighs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from authz.core.policy import SignalSettings
from authz.core.session import Sighting, UserState

# GeoIP city coordinates are approximate: closer than this is "the same place".
_SAME_PLACE_KM = 100.0


@dataclass(frozen=True, slots=True)
class Device:
    """The requesting device, as identified at the edge (certificate, assertion, cookie)."""

    id: str
    source: str  # "mtls", "assertion" or "cookie"
    managed: bool | None = None
    compliant: bool | None = None
    platform: str | None = None


@dataclass(frozen=True, slots=True)
class Geo:
    country: str | None
    lat: float | None = None
    lon: float | None = None


def _posture(device: Device | None, posture_required: bool) -> tuple[bool, bool]:
    """(noncompliant, unmanaged). Only a valid device assertion attests posture; when the
    policy depends on posture, unattested (no device, no assertion, an invalid, expired or
    replayed one) counts as noncompliant and unmanaged -- never as fine."""
    compliant = device.compliant if device is not None else None
    managed = device.managed if device is not None else None
    if posture_required:
        return compliant is not True, managed is not True
    return compliant is False, managed is False


def device_states(
    device: Device | None, state: UserState | None, *, posture_required: bool = False
) -> frozenset[str]:
    """The device's states for rules: known / unknown / absent, plus noncompliant and
    unmanaged (see ``_posture``)."""
    out = (
        {"absent", "unknown"}
        if device is None
        else {"known" if state is not None and state.device_known else "unknown"}
    )
    noncompliant, unmanaged = _posture(device, posture_required)
    if noncompliant:
        out.add("noncompliant")
    if unmanaged:
        out.add("unmanaged")
    return frozenset(out)


def km_between(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine, mean Earth radius)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(a)))


def impossible_travel(last: Sighting | None, geo: Geo | None, now: int, max_kmh: float) -> bool:
    if last is None or geo is None or None in (last.lat, last.lon, geo.lat, geo.lon):
        return False
    assert last.lat is not None and last.lon is not None
    assert geo.lat is not None and geo.lon is not None
    km = km_between(last.lat, last.lon, geo.lat, geo.lon)
    if km < _SAME_PLACE_KM:
        return False
    hours = max(now - last.at, 1) / 3600
    return km / hours > max_kmh


def off_hours(cfg: SignalSettings, now: int) -> bool:
    hours = cfg.hours
    if hours is None:
        return False
    local = datetime.fromtimestamp(now, UTC).astimezone(hours.timezone)
    minute = local.hour * 60 + local.minute
    if hours.start_min <= hours.end_min:
        inside = hours.start_min <= minute < hours.end_min
        day = local.weekday()
    else:  # an overnight window such as 22:00-06:00 belongs to the day it started
        inside = minute >= hours.start_min or minute < hours.end_min
        day = local.weekday() if minute >= hours.start_min else (local.weekday() - 1) % 7
    return not (inside and day in hours.days)


def compute_signals(
    cfg: SignalSettings,
    *,
    device: Device | None,
    state: UserState | None,
    geo: Geo | None,
    now: int,
    posture_required: bool = False,
) -> frozenset[str]:
    """The signals that fire. Signals that need the user's state are silent without it
    (an anonymous request has no history to compare with)."""
    fired: set[str] = set()
    if device is None:
        fired.add("no-device")
    noncompliant, unmanaged = _posture(device, posture_required)
    if noncompliant:
        fired.add("device-noncompliant")
    if unmanaged:
        fired.add("device-unmanaged")
    if cfg.hours is not None and off_hours(cfg, now):
        fired.add("off-hours")
    if state is None:
        return frozenset(fired)
    if device is not None and state.device_known is False:
        fired.add("new-device")
    if state.ip_known is False:
        fired.add("new-ip")
    if not state.level_seen:
        fired.add("first-level-access")
    if cfg.velocity_max is not None and state.velocity > cfg.velocity_max:
        fired.add("velocity")
    if cfg.max_kmh is not None and impossible_travel(state.last_seen, geo, now, cfg.max_kmh):
        fired.add("impossible-travel")
    return frozenset(fired)


def risk_score(cfg: SignalSettings, signals: frozenset[str]) -> int:
    return min(100, sum(cfg.risk_weights.get(s, 0) for s in signals))
