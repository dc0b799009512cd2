"""Identity, evidence of authentication, grants and the session snapshot read per Check.

Everything here is plain data plus freshness helpers that take ``now`` as an argument.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


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

    @property
    def user(self) -> str:
        return f"{self.issuer}|{self.subject}"


@dataclass(frozen=True, slots=True)
class Grant:
    """A time-boxed step-up grant recorded after a verified stronger authentication."""

    level: str
    evidence: Evidence
    expires_at: int
    issued_at: int

    def is_live(self, now: int) -> bool:
        return now < self.expires_at


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """The session state read from the store in one round trip."""

    grants: tuple[Grant, ...] = field(default_factory=tuple)

    def live_grants(self, now: int) -> tuple[Grant, ...]:
        return tuple(g for g in self.grants if g.is_live(now))


EMPTY_SESSION = SessionSnapshot()


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
    """Whether ``evidence`` meets a level's requirements at ``now``.

    ``max_age`` follows OpenID Connect Core 1.0 section 3.1.2.1: the authentication is
    acceptable while ``now - auth_time <= max_age`` (plus leeway for clock skew). An
    ``auth_time`` in the future beyond the leeway is not trusted.
    """
    if acr and evidence.acr not in acr:
        return False
    if amr_any and amr_any.isdisjoint(evidence.amr):
        return False
    if max_age is not None:
        if evidence.auth_time is None:
            return False
        if evidence.auth_time > now + leeway:
            return False
        if now - evidence.auth_time > max_age + leeway:
            return False
    return True
