"""decide(): the pure step-up decision.

Steps, so the service can do its one session read in between:
``route_level`` (route and per-route context -> the level before rules), then
``resolve_level`` (rules over IP, country, device and signals; the level's own IP lists ->
the final level or a deny), then ``evaluate`` (identity, revocation, token evidence,
grants honoured from this device/IP -> allow / login / step-up). ``decide`` composes them
for callers that already hold everything (unit tests, ``policy explain``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from authz.core.attributes import RequestAttributes
from authz.core.policy import Context, Level, Policy, Route
from authz.core.reasons import Reason
from authz.core.session import Evidence, Grant, Identity, UserState, satisfies

CONTEXT_LEVEL_KEY = "stepup_level"


class Outcome(StrEnum):
    ALLOW = "allow"
    LOGIN = "login"  # not signed in (or the token is not acceptable)
    STEP_UP = "step_up"
    DENY = "deny"
    ERROR = "error"  # fail closed: an internal error or a dependency failed


@dataclass(frozen=True, slots=True)
class Resolution:
    """Which level applies to a request, or why it is denied before identity matters."""

    level: Level | None
    route: Route | None
    deny: str | None = None
    fired: tuple[str, ...] = ()  # enforced rule names and context raises
    shadow: tuple[str, ...] = ()  # shadow rules that matched ("would have ...")
    signals: frozenset[str] = field(default_factory=frozenset)
    risk: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    reason: str
    level: Level | None = None
    identity: Identity | None = None
    evidence: Evidence | None = None  # what satisfied the level on ALLOW
    grant: Grant | None = None  # the grant that satisfied it, when one did
    fired: tuple[str, ...] = ()
    shadow: tuple[str, ...] = ()
    signals: frozenset[str] = field(default_factory=frozenset)
    risk: int = 0
    device: str | None = None  # the requesting device's id, when it presented one

    @property
    def acr_values(self) -> tuple[str, ...]:
        return tuple(sorted(self.level.acr)) if self.level is not None else ()

    @property
    def max_age(self) -> int | None:
        return self.level.max_age if self.level is not None else None


def route_level(policy: Policy, attrs: RequestAttributes) -> Resolution:
    """The route's level, raised (never lowered) by Envoy's per-route context."""
    route = policy.route_for(attrs.host, attrs.method, attrs.path)
    level = route.level if route is not None else policy.default_level
    wanted = attrs.context_extensions.get(CONTEXT_LEVEL_KEY)
    if wanted is None:
        return Resolution(level, route)
    ctx = policy.by_name.get(wanted)
    if ctx is None:
        # A proxy asking for a level we do not know is a configuration drift: deny.
        return Resolution(None, route, deny=Reason.UNKNOWN_LEVEL, fired=("context:?",))
    if ctx.rank > level.rank:
        return Resolution(ctx, route, fired=(f"context:{ctx.name}",))
    return Resolution(level, route)


def resolve_level(
    policy: Policy,
    attrs: RequestAttributes,
    ctx: Context | None = None,
    base: Resolution | None = None,
) -> Resolution:
    """Apply the rules (in order; a deny stops) and the final level's IP lists."""
    base = base or route_level(policy, attrs)
    if base.deny is not None or base.level is None:
        return base
    level = base.level
    fired = list(base.fired)
    shadow: list[str] = []
    signals = ctx.signals if ctx is not None else frozenset()
    risk = min(100, sum(policy.signals.risk_weights.get(s, 0) for s in signals))
    ip = attrs.source_ip

    def done(deny: str | None = None) -> Resolution:
        return Resolution(
            level,
            base.route,
            deny=deny,
            fired=tuple(fired),
            shadow=tuple(shadow),
            signals=signals,
            risk=risk,
        )

    for rule in policy.rules:
        if not rule.matches(ip, ctx, level):
            continue
        if rule.shadow:
            shadow.append(rule.name)
            continue
        fired.append(rule.name)
        if rule.deny is not None:
            return done(rule.deny)
        if rule.raise_to is not None and rule.raise_to.rank > level.rank:
            level = rule.raise_to
    if level.ip_deny and (ip is None or any(ip in n for n in level.ip_deny)):
        return done(Reason.IP_NOT_ALLOWED)
    if level.ip_allow and (ip is None or not any(ip in n for n in level.ip_allow)):
        return done(Reason.IP_NOT_ALLOWED)
    return done()


def token_satisfies(level: Level, identity: Identity, now: int, leeway: int) -> bool:
    return _meets(level, identity.evidence, now, leeway)


def _meets(level: Level, evidence: Evidence, now: int, leeway: int) -> bool:
    return satisfies(
        evidence,
        acr=level.acr,
        amr_any=level.amr_any,
        max_age=level.max_age,
        now=now,
        leeway=leeway,
    )


def honoured_here(level: Level, grant: Grant, device: str | None, ip: str | None) -> bool:
    """A level with ``bind`` honours a grant only from the device / IP it was made on."""
    if level.bind_device and (grant.device is None or grant.device != device):
        return False
    return not (level.bind_ip and (grant.ip is None or grant.ip != ip))


def revoked(identity: Identity, state: UserState | None) -> bool:
    if state is None:
        return False
    if state.session_revoked:
        return True
    return state.revoked_before is not None and identity.issued_at < state.revoked_before


def evaluate(
    resolution: Resolution,
    identity: Identity | None,
    grants: Iterable[Grant],
    now: int,
    *,
    leeway: int = 0,
    token_error: str | None = None,
    state: UserState | None = None,
    device: str | None = None,
    ip: str | None = None,
) -> Decision:
    level = resolution.level

    def make(outcome: Outcome, reason: str, **kw: Any) -> Decision:
        return Decision(
            outcome,
            reason,
            level=level,
            fired=resolution.fired,
            shadow=resolution.shadow,
            signals=resolution.signals,
            risk=resolution.risk,
            device=device,
            **kw,
        )

    if resolution.deny is not None:
        return make(Outcome.DENY, resolution.deny, identity=identity)
    assert level is not None
    if level.public:
        return make(Outcome.ALLOW, Reason.PUBLIC, identity=identity)
    if identity is None:
        return make(Outcome.LOGIN, token_error or Reason.NO_CREDENTIALS)
    if revoked(identity, state):
        return make(Outcome.LOGIN, Reason.SESSION_REVOKED)
    if _meets(level, identity.evidence, now, leeway):
        return make(Outcome.ALLOW, Reason.ALLOWED, identity=identity, evidence=identity.evidence)
    candidates = [identity.evidence]
    bound_elsewhere = False
    for grant in grants:
        if not grant.is_live(now):
            continue
        if _meets(level, grant.evidence, now, leeway):
            if honoured_here(level, grant, device, ip):
                return make(
                    Outcome.ALLOW,
                    Reason.ALLOWED,
                    identity=identity,
                    evidence=grant.evidence,
                    grant=grant,
                )
            bound_elsewhere = True
        candidates.append(grant.evidence)
    # Say why: bound to another device/IP, an acceptable factor too old, or none at all.
    if bound_elsewhere:
        reason = Reason.GRANT_BOUND_ELSEWHERE
    elif any(
        satisfies(e, acr=level.acr, amr_any=level.amr_any, max_age=None, now=now, leeway=leeway)
        for e in candidates
    ):
        reason = Reason.AUTH_TOO_OLD
    else:
        reason = Reason.ACR_INSUFFICIENT
    return make(Outcome.STEP_UP, reason, identity=identity)


def decide(
    policy: Policy,
    attrs: RequestAttributes,
    identity: Identity | None,
    state: UserState | None,
    now: int,
    *,
    leeway: int = 0,
    token_error: str | None = None,
    ctx: Context | None = None,
    device: str | None = None,
) -> Decision:
    resolution = resolve_level(policy, attrs, ctx)
    grants = state.grants if state is not None else ()
    ip = str(attrs.source_ip) if attrs.source_ip is not None else None
    return evaluate(
        resolution,
        identity,
        grants,
        now,
        leeway=leeway,
        token_error=token_error,
        state=state,
        device=device,
        ip=ip,
    )
