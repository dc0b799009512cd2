"""Identity, evidence of authentication, grants and the session snapshot read per Check.

Everything here is plain data plus freshness helpers that take ``now`` as an argument.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

from authz.core.reasons import Reason


@dataclass(frozen=True, slots=True)
class Evidence:
    """What an authentication proved: the acr, the amr values and when it happened."""

    acr: str | None
    amr: tuple[str, ...]
    auth_time: int | None


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified token's subject. Built only by the token verifier."""

    issuer: str
    subject: str
    session_id: str  # the `sid` claim, or the configured fallback
    evidence: Evidence
    expires_at: int
    client_id: str | None = None
    issued_at: int = 0

    @property
    def user(self) -> str:
        return f"{self.issuer}|{self.subject}"


@dataclass(frozen=True, slots=True)
class Grant:
    """A time-boxed step-up grant recorded after a verified stronger authentication.

    ``device`` and ``ip`` record where the step-up happened; a level with ``bind`` honours
    the grant only from the same device / IP.
    """

    level: str
    evidence: Evidence
    expires_at: int
    issued_at: int
    device: str | None = None
    ip: str | None = None

    def is_live(self, now: int) -> bool:
        return now < self.expires_at


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """The session state read from the store in one round trip."""

    grants: tuple[Grant, ...] = field(default_factory=tuple)

    def live_grants(self, now: int) -> tuple[Grant, ...]:
        return tuple(g for g in self.grants if g.is_live(now))


EMPTY_SESSION = SessionSnapshot()


@dataclass(frozen=True, slots=True)
class Sighting:
    """Where and when the user was last allowed (for impossible travel), and by which
    session and device: the lesson that wrote it also wrote that session's index entry
    (``authz.check.authorizer``). ``session`` is None for a sighting recorded before it
    was (it then matches no Check and is rewritten); ``device`` is ``device_tag`` of the
    device, None when there was none."""

    at: int
    ip: str
    lat: float | None = None
    lon: float | None = None
    session: str | None = None
    device: str | None = None


def device_tag(device: str | None) -> str | None:
    """What a sighting keeps of a device id: a 64-bit digest, enough to tell whether the
    next allow comes from the same device (a device id is free text up to 256 characters;
    the digest is short and has no separator in it). The sighting is sealed, so the
    digest needs no key."""
    if device is None:
        return None
    return hashlib.blake2b(device.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class UserState:
    """Everything a Check reads about the user and the session, in one round trip.

    ``device_known`` / ``ip_known`` are None when the request presented no device / IP.
    ``velocity`` counts this user's checks on sensitive routes in the sliding window,
    this one included (0 when the route is not sensitive).
    """

    grants: tuple[Grant, ...] = ()
    session_revoked: bool = False
    revoked_before: int | None = None  # tokens issued before this are refused (RevokeUser)
    device_known: bool | None = None
    ip_known: bool | None = None
    level_seen: bool = True  # the user had been allowed at the checked level before
    velocity: int = 0
    last_seen: Sighting | None = None


# RFC 8176 amr values, strongest first: the factor recorded is the strongest one present.
_FACTORS = ("hwk", "fido", "swk", "otp", "sms", "pwd")


def factor_of(amr: tuple[str, ...] | list[str]) -> str:
    """The strongest factor named in ``amr``, as a bounded label (metrics, audit)."""
    for f in _FACTORS:
        if f in amr:
            return f
    return "other" if amr else "none"


def user_key(issuer: str, subject: str) -> str:
    """H(iss, sub): the user's key; it is also the Redis Cluster hash tag of all their keys."""
    return session_key(issuer, subject, "")[:32]


@lru_cache(maxsize=8192)  # a Check computes it for the store and again for its audit record
def session_key(issuer: str, subject: str, session_id: str) -> str:
    """H(iss, sub, sid): a stable, non-reversible key for one sign-in session.

    Length-prefixing each part keeps ("a|b", "c") and ("a", "b|c") apart.
    """
    h = hashlib.sha256()
    for part in (issuer, subject, session_id):
        raw = part.encode("utf-8")
        h.update(len(raw).to_bytes(4, "big"))
        h.update(raw)
    return h.hexdigest()[:40]


def satisfies(
    evidence: Evidence,
    *,
    acr: frozenset[str],
    amr_any: frozenset[str],
    max_age: int | None,
    now: int,
    leeway: int,
) -> bool:
    """Whether ``evidence`` meets a level's requirements at ``now`` (see ``unmet``)."""
    return _unmet(evidence, acr, amr_any, max_age, now, leeway) is None


def unmet(evidence: Evidence, level: Requirements, *, now: int, leeway: int) -> Reason | None:
    """The first of a level's requirements ``evidence`` does not meet, or None.

    ``acr-insufficient`` (the acr is not one the level accepts), ``amr-insufficient`` (no
    accepted method in ``amr``), ``auth-time-missing`` (the level has a ``max_age`` and the
    evidence no ``auth_time``), ``auth-time-future`` (an ``auth_time`` beyond the leeway is
    not trusted) or ``auth-too-old``. ``max_age`` follows OpenID Connect Core 1.0 section
    3.1.2.1: the authentication is acceptable while ``now - auth_time <= max_age`` (plus
    leeway for clock skew).
    """
    return _unmet(evidence, level.acr, level.amr_any, level.max_age, now, leeway)


class Requirements(Protocol):
    """What ``unmet`` reads of a level (``authz.core.policy.Level`` fits)."""

    @property
    def acr(self) -> frozenset[str]: ...
    @property
    def amr_any(self) -> frozenset[str]: ...
    @property
    def max_age(self) -> int | None: ...


def _unmet(
    evidence: Evidence,
    acr: frozenset[str],
    amr_any: frozenset[str],
    max_age: int | None,
    now: int,
    leeway: int,
) -> Reason | None:
    if acr and evidence.acr not in acr:
        return Reason.ACR_INSUFFICIENT
    if amr_any and amr_any.isdisjoint(evidence.amr):
        return Reason.AMR_INSUFFICIENT
    if max_age is not None:
        if evidence.auth_time is None:
            return Reason.AUTH_TIME_MISSING
        if evidence.auth_time > now + leeway:
            return Reason.AUTH_TIME_FUTURE
        if now - evidence.auth_time > max_age + leeway:
            return Reason.AUTH_TOO_OLD
    return None
