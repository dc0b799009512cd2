"""Build audit events from what the service already has: a Decision, the request
attributes, the step-up callback's outcome, a policy reload, a revocation.

Which Check outcomes are audited, and how:

=============  ==============================  =========================================
outcome        event                           path
=============  ==============================  =========================================
allow          access.allowed (level >= the    ``Auditor.durable`` (audit before access)
               configured audit level only)
login          token.rejected (token-invalid,  ``Auditor.emit``
               token-expired) else
               login.required
step_up        stepup.challenge                ``Auditor.emit``
deny           access.denied                   ``Auditor.emit``
error          error.fail_closed               ``Auditor.emit``
=============  ==============================  =========================================
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import MappingProxyType

from authz.audit.events import AuditEvent, EventType, Scalar
from authz.core.attributes import RequestAttributes
from authz.core.decision import Decision, Outcome
from authz.core.policy import Level
from authz.core.session import session_key

_TOKEN_REASONS = frozenset({"token-invalid", "token-expired"})
# RFC 8176 amr values, strongest first: the factor recorded is the strongest one present.
_FACTORS = ("hwk", "fido", "swk", "otp", "sms", "pwd")


def factor_of(amr: tuple[str, ...] | list[str]) -> str:
    for f in _FACTORS:
        if f in amr:
            return f
    return "other" if amr else "none"


def route_of(attrs: RequestAttributes) -> str:
    """Method, host and canonical path. Never the query: it may carry a token or a code."""
    return f"{attrs.method} {attrs.host} {attrs.path}"


def requires_durable(decision: Decision, audit_level: Level | None) -> bool:
    """Whether this decision's allow may be returned only after a durable audit record."""
    return (
        decision.outcome is Outcome.ALLOW
        and audit_level is not None
        and decision.level is not None
        and decision.level.rank >= audit_level.rank
    )


def event_for_check(
    decision: Decision,
    decision_id: str,
    attrs: RequestAttributes | None,
    *,
    audit_level: Level | None,
    policy_version: str | None,
    device: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent | None:
    """The event for one Check, or None when the outcome is not audited (an allow below
    the audit level: those are in the metrics and, if wanted, Envoy's access log)."""
    outcome = decision.outcome
    if outcome is Outcome.ALLOW:
        if not requires_durable(decision, audit_level):
            return None
        etype = EventType.ACCESS_ALLOWED
    elif outcome is Outcome.LOGIN:
        etype = (EventType.TOKEN_REJECTED if str(decision.reason) in _TOKEN_REASONS
                 else EventType.LOGIN_REQUIRED)
    elif outcome is Outcome.STEP_UP:
        etype = EventType.STEPUP_CHALLENGE
    elif outcome is Outcome.DENY:
        etype = EventType.ACCESS_DENIED
    else:
        etype = EventType.ERROR_FAIL_CLOSED
    details: dict[str, Scalar] = {}
    factor: str | None = None
    if decision.evidence is not None:
        ev = decision.evidence
        factor = factor_of(ev.amr)
        details.update(acr=ev.acr, auth_time=ev.auth_time, amr=" ".join(ev.amr))
    if decision.grant is not None:
        g = decision.grant
        details.update(grant_level=g.level, grant_expires_at=g.expires_at,
                       grant_issued_at=g.issued_at)
        details["evidence_source"] = "grant"
    elif decision.evidence is not None:
        details["evidence_source"] = "token"
    if outcome is Outcome.STEP_UP and decision.level is not None:
        details.update(acr_values=" ".join(decision.acr_values), max_age=decision.max_age)
    if decision.fired:
        details["fired"] = ",".join(decision.fired)
    if decision.shadow:  # shadow rules: what they would have done, recorded, not enforced
        details["shadow"] = ",".join(decision.shadow)
    if decision.signals:
        details["signals"] = ",".join(sorted(decision.signals))
        details["risk"] = decision.risk
    ident = decision.identity
    return AuditEvent(
        type=etype,
        decision_id=decision_id,
        user=ident.user if ident is not None else None,
        session=(session_key(ident.issuer, ident.subject, ident.session_id)
                 if ident is not None else None),
        device=device or decision.device,
        client_ip=str(attrs.source_ip) if attrs is not None and attrs.source_ip else None,
        route=route_of(attrs) if attrs is not None else None,
        level=decision.level.name if decision.level is not None else None,
        outcome=outcome.value,
        reason=str(decision.reason),
        factor=factor,
        policy_version=policy_version,
        details=MappingProxyType(details),
        ts_ms=ts_ms if ts_ms is not None else int(time.time() * 1000),
    )


def stepup_completed(
    *,
    result: str,
    level: str | None,
    user: str | None,
    session: str | None,
    acr: str | None,
    amr: tuple[str, ...] | list[str],
    auth_time: int | None,
    issuer: str | None,
    client_ip: str | None = None,
    device: str | None = None,
    grant_expires_at: int | None = None,
    policy_version: str | None = None,
    decision_id: str | None = None,
) -> AuditEvent:
    """The step-up callback's outcome: ``result`` is "success" or the failure slug."""
    return AuditEvent(
        type=EventType.STEPUP_COMPLETED, decision_id=decision_id, user=user, session=session,
        device=device, client_ip=client_ip, level=level,
        outcome="success" if result == "success" else "failure",
        reason=result, factor=factor_of(tuple(amr)), policy_version=policy_version,
        details=MappingProxyType({
            "result": "success" if result == "success" else "failure",
            "acr": acr, "amr": " ".join(amr), "auth_time": auth_time, "issuer": issuer,
            "grant_expires_at": grant_expires_at,
        }),
    )


def policy_reload(*, result: str, old_sha256: str | None, new_sha256: str | None,
                  version: str | None, error: str | None = None) -> AuditEvent:
    details: Mapping[str, Scalar] = MappingProxyType(
        {"old_sha256": old_sha256, "new_sha256": new_sha256, "error": error})
    return AuditEvent(type=EventType.POLICY_RELOAD, outcome=result, policy_version=version,
                      details=details)


def grant_revoked(*, user: str | None, session: str, levels: tuple[str, ...], revoked: int,
                  actor: str | None = None, reason: str | None = None) -> AuditEvent:
    return AuditEvent(
        type=EventType.GRANT_REVOKED, user=user, session=session, outcome="revoked",
        reason=reason, level=",".join(levels),
        details=MappingProxyType({"revoked": revoked, "actor": actor}),
    )
