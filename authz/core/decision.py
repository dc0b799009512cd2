"""The one decision pipeline, pure: the same code decides for the service, for
``policy explain`` and for the tests.

    route_level     route and Envoy's per-route context -> the level before rules
    (the caller's I/O: token, device, GeoIP, the one session read -> ``CheckInputs``)
    decide          signals -> rules and the level's IP lists (``resolve_level``) ->
                    identity, revocation, token evidence, grants honoured from this
                    device/IP (``evaluate``) -> allow / login / step-up / deny

``route_level`` is separate so the service can stop early (a deny or a public level needs no
token and no Redis) and knows which level to read state for. Everything here takes ``now``;
nothing reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from authz.core.attributes import RequestAttributes
from authz.core.policy import Context, Level, Policy, Route
from authz.core.reasons import Reason
from authz.core.session import Evidence, Grant, Identity, UserState, satisfies
from authz.core.signals import Device, Geo, compute_signals, device_states, risk_score

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
    deny: Reason | None = None
    rule_reason: str | None = None  # the policy rule's own slug, with Reason.RULE_DENIED
    fired: tuple[str, ...] = ()  # enforced rule names and context raises
    shadow: tuple[str, ...] = ()  # shadow rules that matched ("would have ...")
    signals: frozenset[str] = field(default_factory=frozenset)
    device_states: frozenset[str] = field(default_factory=frozenset)
    risk: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    reason: Reason
    level: Level | None = None
    identity: Identity | None = None
    evidence: Evidence | None = None  # what satisfied the level on ALLOW
    grant: Grant | None = None  # the grant that satisfied it, when one did
    fired: tuple[str, ...] = ()
    shadow: tuple[str, ...] = ()
    signals: frozenset[str] = field(default_factory=frozenset)
    risk: int = 0
    device: str | None = None  # the requesting device's id, when it presented one
    rule_reason: str | None = None  # a policy rule's deny slug (reason is RULE_DENIED)
    device_states: frozenset[str] = field(default_factory=frozenset)
    # A fail-closed answer that a retry after this many seconds can turn (a JWKS refetch
    # held back by its rate limit): the Retry-After of the denial.
    retry_after_s: int | None = None

    @property
    def slug(self) -> str:
        """The reason as the header, the metric label and the audit record show it: a
        policy rule's own deny slug, else the reason."""
        return self.rule_reason if self.rule_reason is not None else self.reason

    @property
    def acr_values(self) -> tuple[str, ...]:
        return tuple(sorted(self.level.acr)) if self.level is not None else ()

    @property
    def max_age(self) -> int | None:
        return self.level.max_age if self.level is not None else None


def failed(
    reason: Reason,
    level: Level | None = None,
    identity: Identity | None = None,
    device: str | None = None,
    *,
    retry_after_s: int | None = None,
) -> Decision:
    """A fail-closed decision (a dependency failed or an internal error): never an allow."""
    return Decision(
        Outcome.ERROR,
        reason,
        level=level,
        identity=identity,
        device=device,
        retry_after_s=retry_after_s,
    )


def refused(reason: Reason) -> Decision:
    """A deny for a request that could not be read (bad path, bad host, bad framing)."""
    return Decision(Outcome.DENY, reason)


@dataclass(frozen=True, slots=True)
class CheckInputs:
    """What the caller gathered between ``route_level`` and ``decide``: the verified
    identity (or why there is none), the session state from the one read, the device and
    the GeoIP lookup. All optional: an anonymous request has no identity and no state."""

    now: int
    leeway: int = 0
    identity: Identity | None = None
    token_error: Reason | None = None
    state: UserState | None = None
    device: Device | None = None
    geo: Geo | None = None


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
    states = ctx.device if ctx is not None else frozenset()
    risk = risk_score(policy.signals, signals)
    ip = attrs.source_ip

    def done(deny: Reason | None = None, rule_reason: str | None = None) -> Resolution:
        return Resolution(
            level,
            base.route,
            deny=deny,
            rule_reason=rule_reason,
            fired=tuple(fired),
            shadow=tuple(shadow),
            signals=signals,
            device_states=states,
            risk=risk,
        )

    for rule in policy.rules_for(ip, ctx):  # file order; those that cannot fire left out
        if not rule.matches(ip, ctx, level):
            continue
        if rule.shadow:
            shadow.append(rule.name)
            continue
        fired.append(rule.name)
        if rule.deny is not None:
            return done(Reason.RULE_DENIED, rule.deny)
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
    token_error: Reason | None = None,
    state: UserState | None = None,
    device: str | None = None,
    ip: str | None = None,
) -> Decision:
    level = resolution.level

    def make(outcome: Outcome, reason: Reason, **kw: Any) -> Decision:
        return Decision(
            outcome,
            reason,
            level=level,
            fired=resolution.fired,
            shadow=resolution.shadow,
            signals=resolution.signals,
            risk=resolution.risk,
            device=device,
            device_states=resolution.device_states,
            **kw,
        )

    if resolution.deny is not None:
        return make(
            Outcome.DENY, resolution.deny, identity=identity, rule_reason=resolution.rule_reason
        )
    assert level is not None
    if level.public:
        return make(Outcome.ALLOW, Reason.PUBLIC, identity=identity)
    if identity is None:
        return make(Outcome.LOGIN, token_error or Reason.NO_CREDENTIALS)
    if revoked(identity, state):
        return make(Outcome.LOGIN, Reason.SESSION_REVOKED)
    if level.transaction is not None:
        # One approval for one request: neither the token nor a time-boxed grant commits to
        # this request. The caller may turn this with the request's own grant.
        return make(Outcome.STEP_UP, Reason.TRANSACTION_REQUIRED, identity=identity)
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
    inputs: CheckInputs,
    *,
    base: Resolution | None = None,
) -> Decision:
    """The decision for one request: signals, rules, then identity and grants.

    ``base`` is ``route_level(policy, attrs)`` when the caller already computed it (the
    service does, to choose what to read); a deny or an unknown level there stops here.
    """
    base = base or route_level(policy, attrs)
    if base.deny is not None or base.level is None:
        return evaluate(base, None, (), inputs.now, leeway=inputs.leeway)
    state, device, geo = inputs.state, inputs.device, inputs.geo
    posture = policy.uses_posture
    signals = compute_signals(
        policy.signals,
        device=device,
        state=state,
        geo=geo,
        now=inputs.now,
        posture_required=posture,
    )
    ctx = Context(
        device=device_states(device, state, posture_required=posture),
        country=geo.country if geo is not None else None,
        signals=signals,
    )
    resolution = resolve_level(policy, attrs, ctx, base)
    return evaluate(
        resolution,
        inputs.identity,
        state.grants if state is not None else (),
        inputs.now,
        leeway=inputs.leeway,
        token_error=inputs.token_error,
        state=state,
        device=device.id if device is not None else None,
        ip=str(attrs.source_ip) if attrs.source_ip is not None else None,
    )


def with_transaction(
    decision: Decision, grant: Grant | None, now: int, *, leeway: int = 0, ip: str | None = None
) -> Decision:
    """A transaction-bound level's step-up turned by the grant for exactly this request.

    Only the ``transaction-required`` step-up ``evaluate`` gives when everything else held
    (rules, IP lists, identity, revocation) is turned, so the caller consumes the grant only
    then. The grant must be live, meet the level (acr/amr/max_age) and be honoured from
    this device/IP; the allow carries its evidence (the passkey's amr/acr)."""
    level = decision.level
    if (
        grant is None
        or level is None
        or decision.outcome is not Outcome.STEP_UP
        or decision.reason is not Reason.TRANSACTION_REQUIRED
    ):
        return decision
    if not grant.is_live(now) or not _meets(level, grant.evidence, now, leeway):
        return decision
    if not honoured_here(level, grant, decision.device, ip):
        return replace(decision, reason=Reason.GRANT_BOUND_ELSEWHERE)
    return replace(
        decision, outcome=Outcome.ALLOW, reason=Reason.ALLOWED, evidence=grant.evidence, grant=grant
    )
