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

import dataclasses
import time
from collections.abc import Mapping
from functools import lru_cache
from json.encoder import encode_basestring_ascii as _json_str
from types import MappingProxyType

from authz.audit.events import (
    MAX_FIELD_CHARS,
    RECORD_VERSION,
    AuditEvent,
    EventType,
    Scalar,
    encode_event,
    new_event_id,
)
from authz.core.attributes import IpAddress, RequestAttributes
from authz.core.decision import Decision, Outcome
from authz.core.policy import Level
from authz.core.reasons import Reason
from authz.core.session import factor_of, session_key

_TOKEN_REASONS = frozenset({Reason.TOKEN_INVALID, Reason.TOKEN_EXPIRED})


_OUTCOME_TEXT = {o: o.value for o in Outcome}  # enum .value is a property: a lookup is cheaper


@lru_cache(maxsize=4096)
def _ip_text(ip: IpAddress) -> str:
    return str(ip)


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
        etype = (
            EventType.TOKEN_REJECTED
            if decision.reason in _TOKEN_REASONS
            else EventType.LOGIN_REQUIRED
        )
    elif outcome is Outcome.STEP_UP:
        etype = EventType.STEPUP_CHALLENGE
    elif outcome is Outcome.DENY:
        etype = EventType.ACCESS_DENIED
    else:
        etype = EventType.ERROR_FAIL_CLOSED
    details: dict[str, Scalar] = {}
    factor: str | None = None
    ev = decision.evidence
    if ev is not None:
        factor = factor_of(ev.amr)
        details["acr"], details["auth_time"], details["amr"] = (
            ev.acr,
            ev.auth_time,
            " ".join(ev.amr),
        )
    g = decision.grant
    if g is not None:
        details["grant_level"], details["grant_expires_at"], details["grant_issued_at"] = (
            g.level,
            g.expires_at,
            g.issued_at,
        )
        details["evidence_source"] = "grant"
    elif ev is not None:
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
    now_ms = ts_ms if ts_ms is not None else int(time.time() * 1000)
    return AuditEvent(
        type=etype,
        event_id=new_event_id(now_ms),
        ts_ms=now_ms,
        decision_id=decision_id,
        user=ident.user if ident is not None else None,
        session=(
            session_key(ident.issuer, ident.subject, ident.session_id)
            if ident is not None
            else None
        ),
        device=device or decision.device,
        client_ip=(
            _ip_text(attrs.source_ip) if attrs is not None and attrs.source_ip is not None else None
        ),
        route=route_of(attrs) if attrs is not None else None,
        level=decision.level.name if decision.level is not None else None,
        outcome=_OUTCOME_TEXT[outcome],
        reason=decision.slug,
        factor=factor,
        policy_version=policy_version,
        details=MappingProxyType(details),
    )


def allowed_record(
    decision: Decision,
    decision_id: str,
    attrs: RequestAttributes,
    *,
    policy_version: str | None,
    ts_ms: int | None = None,
    event_id: str | None = None,
) -> bytes:
    """The ``access.allowed`` record of an audited allow, encoded directly: exactly
    ``encode_event(event_for_check(...))`` (a property test holds the two equal), without
    building the event and its dict on the one Check path that waits for its record.

    Keys are written in canonical (sorted) order: acr amr auth_time client_ip decision_id
    device event_id evidence_source factor fired grant_* level outcome policy_version reason
    risk route session shadow signals ts_ms type user v. A record shorter than the field
    limit cannot hold a field that needs clipping; a longer one is left to the general
    encoder, which clips."""
    if decision.outcome is not Outcome.ALLOW:
        raise ValueError(f"allowed_record: the decision is {decision.outcome.value!r}")
    ev, g, ident = decision.evidence, decision.grant, decision.identity
    now_ms = ts_ms if ts_ms is not None else int(time.time() * 1000)
    if (
        decision.level is None
        or (ev is not None and ev.auth_time is not None and type(ev.auth_time) is not int)
        or (g is not None and not (type(g.expires_at) is int and type(g.issued_at) is int))
        or type(decision.risk) is not int
    ):
        # Not the shape this template writes: the general encoder says it (or refuses it).
        return _generic_allowed(decision, decision_id, attrs, policy_version, now_ms, event_id)
    q = _json_str
    parts: list[str] = []
    add = parts.append
    if ev is not None:
        add(
            f'"acr":{"null" if ev.acr is None else q(ev.acr)},"amr":{q(" ".join(ev.amr))},'
            f'"auth_time":{"null" if ev.auth_time is None else ev.auth_time},'
        )
    ip = attrs.source_ip
    device = decision.device
    add(
        f'"client_ip":{"null" if ip is None else q(_ip_text(ip))},'
        f'"decision_id":{q(decision_id)},"device":{"null" if device is None else q(device)},'
        f'"event_id":{q(event_id if event_id is not None else new_event_id(now_ms))},'
    )
    if g is not None:
        add('"evidence_source":"grant",')
    elif ev is not None:
        add('"evidence_source":"token",')
    add(f'"factor":"{factor_of(ev.amr)}",' if ev is not None else '"factor":null,')
    if decision.fired:
        add(f'"fired":{q(",".join(decision.fired))},')
    if g is not None:
        add(
            f'"grant_expires_at":{g.expires_at},"grant_issued_at":{g.issued_at},'
            f'"grant_level":{q(g.level)},'
        )
    add(
        f'"level":{q(decision.level.name)},"outcome":"allow",'
        f'"policy_version":{"null" if policy_version is None else q(policy_version)},'
        f'"reason":{q(decision.slug)},'
    )
    if decision.signals:
        add(f'"risk":{decision.risk},')
    add(f'"route":{q(route_of(attrs))},')
    add(
        '"session":null,'
        if ident is None
        else f'"session":"{session_key(ident.issuer, ident.subject, ident.session_id)}",'
    )
    if decision.shadow:
        add(f'"shadow":{q(",".join(decision.shadow))},')
    if decision.signals:
        add(f'"signals":{q(",".join(sorted(decision.signals)))},')
    add(
        f'"ts_ms":{now_ms},"type":"access.allowed",'
        f'"user":{"null" if ident is None else q(ident.user)},"v":{RECORD_VERSION}}}'
    )
    text = "{" + "".join(parts)
    if len(text) > MAX_FIELD_CHARS:  # some field may be over the limit: clip it
        return _generic_allowed(decision, decision_id, attrs, policy_version, now_ms, event_id)
    return text.encode("ascii")  # json's C escaper escapes DEL and all non-ASCII


def _generic_allowed(
    decision: Decision,
    decision_id: str,
    attrs: RequestAttributes,
    policy_version: str | None,
    ts_ms: int,
    event_id: str | None,
) -> bytes:
    event = event_for_check(
        decision,
        decision_id,
        attrs,
        audit_level=decision.level,
        policy_version=policy_version,
        ts_ms=ts_ms,
    )
    if event is None:
        raise ValueError("allowed_record: the decision is not an audited allow")
    if event_id is not None:
        event = dataclasses.replace(event, event_id=event_id)
    return encode_event(event)


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
        type=EventType.STEPUP_COMPLETED,
        decision_id=decision_id,
        user=user,
        session=session,
        device=device,
        client_ip=client_ip,
        level=level,
        outcome="success" if result == Reason.SUCCESS else "failure",
        reason=result,
        factor=factor_of(tuple(amr)),
        policy_version=policy_version,
        details=MappingProxyType(
            {
                "result": "success" if result == Reason.SUCCESS else "failure",
                "acr": acr,
                "amr": " ".join(amr),
                "auth_time": auth_time,
                "issuer": issuer,
                "grant_expires_at": grant_expires_at,
            }
        ),
    )


def policy_reload(
    *,
    result: str,
    old_sha256: str | None,
    new_sha256: str | None,
    version: str | None,
    error: str | None = None,
) -> AuditEvent:
    details: Mapping[str, Scalar] = MappingProxyType(
        {"old_sha256": old_sha256, "new_sha256": new_sha256, "error": error}
    )
    return AuditEvent(
        type=EventType.POLICY_RELOAD, outcome=result, policy_version=version, details=details
    )


def grant_revoked(
    *,
    user: str | None,
    session: str,
    levels: tuple[str, ...],
    revoked: int,
    actor: str | None = None,
    reason: str | None = None,
) -> AuditEvent:
    return AuditEvent(
        type=EventType.GRANT_REVOKED,
        user=user,
        session=session,
        outcome="revoked",
        reason=reason,
        level=",".join(levels),
        details=MappingProxyType({"revoked": revoked, "actor": actor}),
    )


def sessions_listed(*, user: str, actor: str, count: int) -> AuditEvent:
    """A Sessions API read: the caller looked at a user's sessions (IPs, devices)."""
    return AuditEvent(
        type=EventType.SESSIONS_LISTED,
        user=user,
        outcome="read",
        details=MappingProxyType({"actor": actor, "sessions": count}),
    )
