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
        type=EventType.POLICY_RELOAD,
        outcome=result,
        reason=Reason.SUCCESS if result == "success" else Reason.POLICY_INVALID,
        policy_version=version,
        details=details,
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


# -- authentication events of the flows (called by authz/stepup and authz/admin) ------------
#
# Every builder takes what the flow knows at that point and gives the record the common
# fields an examiner asks for: ``user`` ("iss|sub", None when the failure came before a
# verified identity), ``ts_ms`` (UTC epoch ms; injected in tests), ``factor`` (the strongest
# RFC 8176 amr value, or the one the flow names), ``outcome`` and ``reason`` (a slug). A
# failure's ``reason`` is the same slug as the metric label and the error page's log line.


def _now_ms(ts_ms: int | None) -> int:
    return int(time.time() * 1000) if ts_ms is None else ts_ms


def _flow_event(
    etype: EventType,
    *,
    ts_ms: int | None,
    outcome: str,
    reason: str | None,
    user: str | None,
    factor: str | None = None,
    amr: tuple[str, ...] | list[str] | None = None,
    session: str | None = None,
    device: str | None = None,
    client_ip: str | None = None,
    route: str | None = None,
    level: str | None = None,
    decision_id: str | None = None,
    policy_version: str | None = None,
    **details: Scalar,
) -> AuditEvent:
    now = _now_ms(ts_ms)
    if amr is not None:
        details["amr"] = " ".join(amr)
        if factor is None:
            factor = factor_of(tuple(amr))
    return AuditEvent(
        type=etype,
        event_id=new_event_id(now),
        ts_ms=now,
        decision_id=decision_id,
        user=user,
        session=session,
        device=device,
        client_ip=client_ip,
        route=route,
        level=level,
        outcome=outcome,
        reason=reason,
        factor=factor,
        policy_version=policy_version,
        details=MappingProxyType({k: v for k, v in details.items() if v is not None}),
    )


def _result(reason: str | None) -> tuple[str, str]:
    """(outcome, reason): None or "success" is a success, any other slug a failure."""
    return ("success", "success") if reason in (None, "success") else ("failure", str(reason))


def login_completed(
    *,
    failure: str | None = None,
    user: str | None,
    session: str | None = None,
    issuer: str | None = None,
    acr: str | None = None,
    amr: tuple[str, ...] | list[str] = (),
    auth_time: int | None = None,
    client_ip: str | None = None,
    device: str | None = None,
    decision_id: str | None = None,
    idp_error: str | None = None,
    error: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """The first-factor sign-in (``/_stepup/login`` callback): ``failure`` None for a
    completed sign-in, else the slug (``authz.core.reasons.Reason``); ``idp_error`` the IdP's
    ``error`` parameter (e.g. ``access_denied``) when it sent one; ``error`` in words."""
    outcome, reason = _result(failure)
    return _flow_event(
        EventType.LOGIN_COMPLETED,
        ts_ms=ts_ms,
        outcome=outcome,
        reason=reason,
        user=user,
        amr=amr,
        session=session,
        device=device,
        client_ip=client_ip,
        decision_id=decision_id,
        issuer=issuer,
        acr=acr,
        auth_time=auth_time,
        idp_error=idp_error,
        error=error,
    )


def stepup_started(
    *,
    level: str,
    user: str,
    session: str | None,
    acr_values: tuple[str, ...] | list[str] = (),
    max_age: int | None = None,
    client_ip: str | None = None,
    device: str | None = None,
    route: str | None = None,
    decision_id: str | None = None,
    policy_version: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """``/_stepup/start`` sent the user to the IdP for ``level`` (``acr_values``, ``max_age``
    as requested). ``factor`` is null: none was used yet."""
    return _flow_event(
        EventType.STEPUP_STARTED,
        ts_ms=ts_ms,
        outcome="started",
        reason="redirected-to-idp",
        user=user,
        session=session,
        device=device,
        client_ip=client_ip,
        route=route,
        level=level,
        decision_id=decision_id,
        policy_version=policy_version,
        acr_values=" ".join(acr_values),
        max_age=max_age,
    )


def stepup_failed(
    *,
    reason: Reason | str,
    level: str | None,
    user: str | None,
    session: str | None = None,
    issuer: str | None = None,
    acr: str | None = None,
    amr: tuple[str, ...] | list[str] = (),
    auth_time: int | None = None,
    client_ip: str | None = None,
    device: str | None = None,
    decision_id: str | None = None,
    idp_error: str | None = None,
    policy_version: str | None = None,
    error: str | None = None,
    proved_user: str | None = None,
    route: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """A refused step-up callback (one record per refusal). ``decision_id`` is the id the
    error page shows (and the service log line has); ``user`` None when the refusal came
    before an ID token was verified (state missing, cookie mismatch, IdP error ...).
    ``proved_user`` the ID token's user when it is not ``user`` (someone else signed in);
    ``error`` in words."""
    return _flow_event(
        EventType.STEPUP_FAILED,
        ts_ms=ts_ms,
        outcome="failure",
        reason=str(reason),
        user=user,
        amr=amr,
        session=session,
        device=device,
        client_ip=client_ip,
        level=level,
        decision_id=decision_id,
        policy_version=policy_version,
        issuer=issuer,
        acr=acr,
        auth_time=auth_time,
        idp_error=idp_error,
        error=error,
        proved_user=proved_user,
        route=route,
    )


def stepup_cancelled(
    *,
    level: str | None,
    user: str | None,
    session: str | None = None,
    reason: str = Reason.USER_CANCELLED,
    client_ip: str | None = None,
    device: str | None = None,
    decision_id: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """The user abandoned a step-up (cancelled at the IdP, or the cancel link)."""
    return _flow_event(
        EventType.STEPUP_CANCELLED,
        ts_ms=ts_ms,
        outcome="cancelled",
        reason=reason,
        user=user,
        session=session,
        device=device,
        client_ip=client_ip,
        level=level,
        decision_id=decision_id,
    )


def logout(
    *,
    via: str,
    user: str | None,
    session: str | None,
    failure: str | None = None,
    issuer: str | None = None,
    grants_ended: int | None = None,
    client_ip: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """A logout: ``via`` is ``rp-initiated`` (the user's browser) or ``back-channel`` (the
    IdP's logout token, OIDC Back-Channel Logout 1.0); ``failure`` the refusal slug."""
    outcome, reason = _result(failure)
    return _flow_event(
        EventType.LOGOUT,
        ts_ms=ts_ms,
        outcome=outcome,
        reason=reason,
        user=user,
        session=session,
        client_ip=client_ip,
        via=via,
        issuer=issuer,
        grants_ended=grants_ended,
    )


def grant_recorded(
    *,
    caller: str,
    user: str | None,
    session: str | None,
    level: str | None,
    failure: str | None = None,
    acr: str | None = None,
    amr: tuple[str, ...] | list[str] = (),
    auth_time: int | None = None,
    grant_expires_at: int | None = None,
    client_ip: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """Sessions API RecordGrant: ``caller`` the authenticated factor service."""
    outcome, reason = _result(failure)
    return _flow_event(
        EventType.GRANT_RECORDED,
        ts_ms=ts_ms,
        outcome=outcome,
        reason=reason,
        user=user,
        amr=amr,
        session=session,
        client_ip=client_ip,
        level=level,
        caller=caller,
        acr=acr,
        auth_time=auth_time,
        grant_expires_at=grant_expires_at,
    )


def grant_revoked_by(
    *,
    caller: str,
    user: str | None,
    session: str | None,
    levels: tuple[str, ...] = (),
    revoked: int = 0,
    failure: str | None = None,
    reason: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """Sessions API revocation, with its caller (``grant.revoked``; ``reason`` the caller's
    stated reason, kept as ``revoke_reason``)."""
    outcome, slug = ("revoked", "revoked") if failure is None else ("failure", failure)
    return _flow_event(
        EventType.GRANT_REVOKED,
        ts_ms=ts_ms,
        outcome=outcome,
        reason=slug,
        user=user,
        session=session,
        level=",".join(levels) or None,
        caller=caller,
        actor=caller,
        revoked=revoked,
        revoke_reason=reason,
    )


def sessions_listed(
    *,
    caller: str,
    user: str | None,
    count: int = 0,
    failure: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """Sessions API ListSessions: who read whose sessions, and how many."""
    outcome, reason = _result(failure)
    return _flow_event(
        EventType.SESSIONS_LISTED,
        ts_ms=ts_ms,
        outcome=outcome,
        reason=reason,
        user=user,
        caller=caller,
        count=count,
    )


def passkey_enrolled(
    *,
    user: str,
    credential: str,
    session: str | None = None,
    factor: str = "hwk",
    failure: str | None = None,
    aaguid: str | None = None,
    client_ip: str | None = None,
    device: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """A passkey registered (``credential``: a hash of the credential id, never the id)."""
    outcome, reason = _result(failure)
    return _flow_event(
        EventType.PASSKEY_ENROLLED,
        ts_ms=ts_ms,
        outcome=outcome,
        reason=reason,
        user=user,
        factor=factor,
        session=session,
        client_ip=client_ip,
        device=device,
        credential=credential,
        aaguid=aaguid,
    )


def passkey_removed(
    *,
    user: str,
    credential: str,
    caller: str | None = None,
    session: str | None = None,
    failure: str | None = None,
    client_ip: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """A passkey removed, by the user (``caller`` None) or an operator / API caller."""
    outcome, reason = _result(failure)
    return _flow_event(
        EventType.PASSKEY_REMOVED,
        ts_ms=ts_ms,
        outcome=outcome,
        reason=reason,
        user=user,
        session=session,
        client_ip=client_ip,
        credential=credential,
        caller=caller,
    )


def passkey_ceremony(
    *,
    ceremony: str,
    user: str | None,
    failure: str | None = None,
    credential: str | None = None,
    level: str | None = None,
    factor: str = "hwk",
    user_verified: bool | None = None,
    session: str | None = None,
    client_ip: str | None = None,
    device: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """One WebAuthn ceremony's result: ``ceremony`` ``registration`` or ``authentication``."""
    outcome, reason = _result(failure)
    return _flow_event(
        EventType.PASSKEY_CEREMONY,
        ts_ms=ts_ms,
        outcome=outcome,
        reason=reason,
        user=user,
        factor=factor,
        session=session,
        client_ip=client_ip,
        device=device,
        level=level,
        ceremony=ceremony,
        credential=credential,
        user_verified=user_verified,
    )


# -- push step-up: OpenID CIBA (authz.stepup.ciba) ------------------------------------------
#
# One request, from the API client's start to its end: ``ciba.started`` when the IdP accepted
# the backchannel request, then exactly one of ``ciba.completed`` (written durably before the
# grant is stored) or ``ciba.failed`` (the user denied it, it expired, the IdP or the grant
# rule refused it). ``request_id`` joins them: a hash of the IdP's ``auth_req_id``, never the
# id itself. ``route`` is the action the client named (method, host, canonical path).


def ciba_started(
    *,
    level: str,
    user: str,
    session: str | None,
    request_id: str,
    acr_values: tuple[str, ...] | list[str] = (),
    binding: bool = False,
    route: str | None = None,
    client_ip: str | None = None,
    device: str | None = None,
    policy_version: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """The IdP accepted a backchannel authentication request for ``level``: the user is
    asked on another device. ``binding`` whether a binding message went with it; ``factor``
    is null until the user has approved."""
    return _flow_event(
        EventType.CIBA_STARTED,
        ts_ms=ts_ms,
        outcome="started",
        reason="sent-to-idp",
        user=user,
        session=session,
        device=device,
        client_ip=client_ip,
        route=route,
        level=level,
        policy_version=policy_version,
        request_id=request_id,
        acr_values=" ".join(acr_values),
        binding=binding,
    )


def ciba_completed(
    *,
    level: str,
    user: str,
    session: str | None,
    request_id: str,
    acr: str | None,
    amr: tuple[str, ...] | list[str],
    auth_time: int | None,
    issuer: str | None,
    grant_expires_at: int | None,
    route: str | None = None,
    device: str | None = None,
    client_ip: str | None = None,
    decision_id: str | None = None,
    policy_version: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """The approval's ID token passed the grant rule; durable before the grant is stored."""
    return _flow_event(
        EventType.CIBA_COMPLETED,
        ts_ms=ts_ms,
        outcome="success",
        reason=Reason.SUCCESS,
        user=user,
        amr=amr,
        session=session,
        device=device,
        client_ip=client_ip,
        route=route,
        level=level,
        decision_id=decision_id,
        policy_version=policy_version,
        request_id=request_id,
        acr=acr,
        auth_time=auth_time,
        issuer=issuer,
        grant_expires_at=grant_expires_at,
    )


def ciba_failed(
    *,
    reason: Reason | str,
    level: str | None,
    user: str | None,
    session: str | None = None,
    request_id: str | None = None,
    idp_error: str | None = None,
    acr: str | None = None,
    amr: tuple[str, ...] | list[str] = (),
    auth_time: int | None = None,
    error: str | None = None,
    route: str | None = None,
    client_ip: str | None = None,
    device: str | None = None,
    decision_id: str | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """A push step-up that did not become a grant, or a start refused: ``ciba-denied`` (the
    user said no; ``idp_error`` ``access_denied``), ``ciba-expired``, ``rate-limited``,
    ``ciba-pending``, ``idp-error`` (the IdP refused the request), ``token-rejected``, or the
    grant rule's slug (``acr-insufficient``, ``subject-mismatch`` ...); ``error`` in words."""
    return _flow_event(
        EventType.CIBA_FAILED,
        ts_ms=ts_ms,
        outcome="failure",
        reason=str(reason),
        user=user,
        amr=amr,
        session=session,
        device=device,
        client_ip=client_ip,
        route=route,
        level=level,
        decision_id=decision_id,
        request_id=request_id,
        idp_error=idp_error,
        acr=acr,
        auth_time=auth_time,
        error=error,
    )


# -- the trail's own records ---------------------------------------------------------------


def producer_started(
    *, first_seq: int, mac_kid: str, host: str, pid: int, ts_ms: int | None = None
) -> AuditEvent:
    """A producer's first record (its sequence number is ``first_seq``): the exporter
    learns the producer from it, so a restart is a new producer, not a gap."""
    return _flow_event(
        EventType.PRODUCER_STARTED,
        ts_ms=ts_ms,
        outcome="started",
        reason="producer-started",
        user=None,
        first_seq=first_seq,
        mac_kid=mac_kid,
        host=host,
        pid=pid,
    )


def producer_heartbeat(*, last_seq: int, ts_ms: int | None = None) -> AuditEvent:
    """Written by an idle producer: "I am alive and have written up to ``last_seq``", so a
    deleted tail shows as a gap within a heartbeat interval."""
    return _flow_event(
        EventType.PRODUCER_HEARTBEAT,
        ts_ms=ts_ms,
        outcome="alive",
        reason="idle",
        user=None,
        last_seq=last_seq,
    )


def producer_stopped(*, dropped: int, ts_ms: int | None = None) -> AuditEvent:
    """A producer's last record at a graceful stop (its own sequence number is the last);
    ``dropped`` how many records it could not write (``audit_dropped_total``)."""
    return _flow_event(
        EventType.PRODUCER_STOPPED,
        ts_ms=ts_ms,
        outcome="stopped",
        reason="shutdown",
        user=None,
        dropped=dropped,
    )


def producer_silent(
    *, of: str, last_seq: int, last_seen_ms: int, ts_ms: int | None = None
) -> AuditEvent:
    """(exporter) A producer wrote nothing, not even a heartbeat, for too long and never
    stopped: killed, or its newest records were deleted. Records after ``last_seq`` cannot
    be accounted for."""
    return _flow_event(
        EventType.PRODUCER_SILENT,
        ts_ms=ts_ms,
        outcome="silent",
        reason="no-stop-record",
        user=None,
        of_producer=of,
        last_seq=last_seq,
        last_seen_ms=last_seen_ms,
    )


def sequence_gap(
    *, of: str, first_missing: int, last_missing: int, ts_ms: int | None = None
) -> AuditEvent:
    """(exporter) Records ``first_missing..last_missing`` of producer ``of`` never reached
    the archive: deleted from the stream, or lost by the producer (see audit_dropped)."""
    return _flow_event(
        EventType.SEQUENCE_GAP,
        ts_ms=ts_ms,
        outcome="missing",
        reason="sequence-gap",
        user=None,
        of_producer=of,
        first_missing=first_missing,
        last_missing=last_missing,
        missing=last_missing - first_missing + 1,
    )


def quarantined(
    *,
    reason: str,
    raw: str,
    claimed_producer: str | None = None,
    claimed_seq: int | None = None,
    ts_ms: int | None = None,
) -> AuditEvent:
    """(exporter) A stream entry that did not verify (``reason``: mac-missing, mac-invalid,
    unknown-key, unknown-producer, malformed-entry, sequence-replayed, after-stop ...),
    kept as text in ``raw`` and never as the record it claims to be."""
    return _flow_event(
        EventType.QUARANTINED,
        ts_ms=ts_ms,
        outcome="quarantined",
        reason=reason,
        user=None,
        raw=raw[:4096],
        claimed_producer=claimed_producer,
        claimed_seq=claimed_seq,
    )
