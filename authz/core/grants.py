"""The one rule every grant is born through.

A grant is a time-boxed record that a session proved a stronger factor. Every path that
creates one -- the step-up callback (an ID token from the IdP), the Sessions API (an
external factor service's signed proof), a passkey ceremony, a CIBA approval -- states
what was proved (a ``Proof``) and for which session (a ``Target``), and ``grant_for``
decides. Nothing else builds a ``Grant`` for the store.

The rule, in order (the first failure is the refusal's reason):

1. the level exists and asks for evidence (``level-not-grantable`` otherwise: a grant for
   a level that needs none would never be read);
2. the proof is about the target's user: same issuer and subject (``issuer-mismatch``,
   ``subject-mismatch``) -- a factor proved by someone else never elevates this session;
3. ``auth_time`` is present, not in the future beyond the leeway (the grant's lifetime
   counts from it), and not before the challenge it answers (``auth-too-old``: an older
   authentication is not a fresh proof for this step-up);
4. the evidence satisfies the level (acr, amr, max_age; ``core.session.unmet``);
5. binding: a level with ``bind: [device]`` / ``[ip]`` needs the device / IP the
   challenge was issued for, and the proof must come from that same device / IP
   (``device-mismatch``, ``ip-mismatch``): a link opened on another device cannot bind a
   grant to the device that asked for it;
6. expiry = ``auth_time`` + the level's ``grant_ttl`` (else ``max_age``, else the service
   default), capped by the caller's own cap; a grant that would already have expired is
   refused (``auth-too-old``). The grant records the device and IP the proof came from.

Pure: time comes in as ``now``; the caller writes the grant and its audit record.
"""

from __future__ import annotations

from dataclasses import dataclass

from authz.core.policy import Level
from authz.core.reasons import Reason
from authz.core.session import Evidence, Grant, unmet


class GrantRefused(Exception):
    """The proof does not become a grant; ``reason`` says which rule failed."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else str(reason))


@dataclass(frozen=True, slots=True)
class Target:
    """The session a grant would be recorded for, as the challenge saw it."""

    issuer: str
    subject: str
    device: str | None = None  # the device the challenge was issued to (bound levels)
    ip: str | None = None  # the client address the challenge was issued to


@dataclass(frozen=True, slots=True)
class Proof:
    """What a verified factor proved, and where it was completed.

    ``challenged_at``: when the step-up was asked for (the proof's ``auth_time`` must not
    precede it); None where the path has no challenge of its own (an API grant).
    ``device`` / ``ip``: where the proof was completed, when the path knows it.
    """

    issuer: str
    subject: str
    evidence: Evidence
    challenged_at: int | None = None
    device: str | None = None
    ip: str | None = None


def grant_for(
    level: Level | None,
    target: Target,
    proof: Proof,
    *,
    now: int,
    leeway: int,
    default_ttl_s: int,
    ttl_cap_s: int | None = None,
) -> Grant:
    """The grant ``proof`` earns ``target`` at ``level``; GrantRefused otherwise."""
    if level is None:
        raise GrantRefused(Reason.LEVEL_UNKNOWN)
    if level.public or not level.needs_evidence:
        raise GrantRefused(Reason.LEVEL_NOT_GRANTABLE, f"{level.name} asks for no evidence")
    if proof.issuer != target.issuer:
        raise GrantRefused(Reason.ISSUER_MISMATCH)
    if proof.subject != target.subject:
        raise GrantRefused(Reason.SUBJECT_MISMATCH)
    ev = proof.evidence
    if ev.auth_time is None:
        raise GrantRefused(Reason.AUTH_TIME_MISSING)
    if ev.auth_time > now + leeway:
        raise GrantRefused(Reason.AUTH_TIME_FUTURE, "auth_time is in the future")
    if proof.challenged_at is not None and ev.auth_time < proof.challenged_at - leeway:
        raise GrantRefused(Reason.AUTH_TOO_OLD, "authenticated before the challenge")
    failed = unmet(ev, level, now=now, leeway=leeway)
    if failed is not None:
        raise GrantRefused(failed, f"the evidence does not satisfy {level.name}")
    if level.bind_device:
        if target.device is None:
            raise GrantRefused(Reason.DEVICE_REQUIRED, f"{level.name} is bound to a device")
        if proof.device != target.device:
            raise GrantRefused(Reason.DEVICE_MISMATCH)
    if level.bind_ip:
        if target.ip is None:
            raise GrantRefused(Reason.IP_REQUIRED, f"{level.name} is bound to an address")
        if proof.ip != target.ip:
            raise GrantRefused(Reason.IP_MISMATCH)
    ttl = level.grant_ttl or level.max_age or default_ttl_s
    if ttl_cap_s:
        ttl = min(ttl, ttl_cap_s)
    expires_at = ev.auth_time + ttl
    if expires_at - now < 1:
        raise GrantRefused(Reason.AUTH_TOO_OLD, "the grant would already have expired")
    # Where the factor was proved: for a bound level the same as the challenge's (checked
    # above); for others, never the device a link was issued for (an attacker's link
    # opened on the victim's browser must not make the attacker's device "known").
    return Grant(
        level=level.name,
        evidence=ev,
        expires_at=expires_at,
        issued_at=now,
        device=proof.device,
        ip=proof.ip,
    )
