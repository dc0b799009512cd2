"""decide(): the pure step-up decision.

Two steps, so the service can skip the session read when it is not needed:
``resolve_level`` (route, per-route context, rules -> level or deny) and ``evaluate``
(identity, token evidence, session grants -> allow / login / step-up). ``decide`` composes
both for callers that already hold everything (unit tests, ``policy explain``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from authz.core.attributes import RequestAttributes
from authz.core.policy import Level, Policy, Route
from authz.core.reasons import Reason
from authz.core.session import Evidence, Grant, Identity, SessionSnapshot, satisfies

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
    fired: tuple[str, ...] = ()  # rule names and context raises, for explain and audit


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    reason: str
    level: Level | None = None
    identity: Identity | None = None
    evidence: Evidence | None = None  # what satisfied the level on ALLOW
    grant: Grant | None = None  # the grant that satisfied it, when one did
    fired: tuple[str, ...] = ()

    @property
    def acr_values(self) -> tuple[str, ...]:
        return tuple(sorted(self.level.acr)) if self.level is not None else ()

    @property
    def max_age(self) -> int | None:
        return self.level.max_age if self.level is not None else None


def resolve_level(policy: Policy, attrs: RequestAttributes) -> Resolution:
    route = policy.route_for(attrs.host, attrs.method, attrs.path)
    level = route.level if route is not None else policy.default_level
    fired: list[str] = []
    wanted = attrs.context_extensions.get(CONTEXT_LEVEL_KEY)
    if wanted is not None:
        ctx = policy.by_name.get(wanted)
        if ctx is None:
            # A proxy asking for a level we do not know is a configuration drift: deny.
            return Resolution(None, route, deny=Reason.UNKNOWN_LEVEL, fired=("context:?",))
        if ctx.rank > level.rank:  # raise, never lower
            level = ctx
            fired.append(f"context:{ctx.name}")
    for rule in policy.rules:
        if rule.matches(attrs.source_ip):
            fired.append(rule.name)
            if rule.deny is not None:
                return Resolution(level, route, deny=rule.deny, fired=tuple(fired))
            if rule.raise_to is not None and rule.raise_to.rank > level.rank:
                level = rule.raise_to
    return Resolution(level, route, fired=tuple(fired))


def token_satisfies(level: Level, identity: Identity, now: int, leeway: int) -> bool:
    return _meets(level, identity.evidence, now, leeway)


def _meets(level: Level, evidence: Evidence, now: int, leeway: int) -> bool:
    return satisfies(
        evidence, acr=level.acr, amr_any=level.amr_any, max_age=level.max_age, now=now,
        leeway=leeway,
    )


def evaluate(
    resolution: Resolution,
    identity: Identity | None,
    grants: Iterable[Grant],
    now: int,
    *,
    leeway: int = 0,
    token_error: str | None = None,
) -> Decision:
    level, fired = resolution.level, resolution.fired
    if resolution.deny is not None:
        return Decision(Outcome.DENY, resolution.deny, level=level, identity=identity, fired=fired)
    assert level is not None
    if level.public:
        return Decision(Outcome.ALLOW, Reason.PUBLIC, level=level, identity=identity, fired=fired)
    if identity is None:
        return Decision(Outcome.LOGIN, token_error or Reason.NO_CREDENTIALS, level=level,
                        fired=fired)
    if _meets(level, identity.evidence, now, leeway):
        return Decision(Outcome.ALLOW, Reason.ALLOWED, level=level, identity=identity,
                        evidence=identity.evidence, fired=fired)
    candidates = [identity.evidence]
    for grant in grants:
        if not grant.is_live(now):
            continue
        if _meets(level, grant.evidence, now, leeway):
            return Decision(Outcome.ALLOW, Reason.ALLOWED, level=level, identity=identity,
                            evidence=grant.evidence, grant=grant, fired=fired)
        candidates.append(grant.evidence)
    # Say why: an acceptable factor that is too old, or no acceptable factor at all.
    stale = any(
        satisfies(e, acr=level.acr, amr_any=level.amr_any, max_age=None, now=now, leeway=leeway)
        for e in candidates
    )
    reason = Reason.AUTH_TOO_OLD if stale else Reason.ACR_INSUFFICIENT
    return Decision(Outcome.STEP_UP, reason, level=level, identity=identity, fired=fired)


def decide(
    policy: Policy,
    attrs: RequestAttributes,
    identity: Identity | None,
    session: SessionSnapshot | None,
    now: int,
    *,
    leeway: int = 0,
    token_error: str | None = None,
) -> Decision:
    resolution = resolve_level(policy, attrs)
    grants = session.grants if session is not None else ()
    return evaluate(resolution, identity, grants, now, leeway=leeway, token_error=token_error)
