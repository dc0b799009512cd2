"""What the audit trail records of passkeys, and how the registry is rebuilt from it.

Three record types (the ``type`` of the audit record):

=====================  ========================================================  =========
type                   details                                                   outcome
=====================  ========================================================  =========
``passkey.ceremony``   ceremony (register / authenticate), credential_id, rule,     started,
                       clone_suspected                                           success,
                                                                                 refused
``passkey.enrolled``   the whole public credential: credential_id, public_key,   success
                       aaguid, sign_count, issuer, subject, rp_id, created_at,
                       credential_name, backup_eligible, backup_state,
                       transports, attestation_fmt, certified, user_verified,
                       enrolled_level
``passkey.removed``    credential_id, aaguid, public_key, issuer, subject,       success
                       removed_by (user / operator)
=====================  ========================================================  =========

An enrolment record carries everything ``Credential`` holds, so ``replay`` rebuilds the
registry from an archive: enrolments in order, minus later removals (``passkeys restore
--from-archive``). Nothing secret is in them: a public key and its id.

``to_audit_event`` is the one place this module meets ``authz.audit.events``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from authz.audit.events import AuditEvent, EventType, Scalar
from authz.core.encoding import b64u, unb64u
from authz.core.reasons import Reason
from authz.store.credentials import Credential

CEREMONY = "passkey.ceremony"
ENROLLED = "passkey.enrolled"
REMOVED = "passkey.removed"
FACTOR = "passkey"


@dataclass(frozen=True, slots=True)
class PasskeyRecord:
    type: str
    outcome: str
    user: str | None = None
    session: str | None = None
    level: str | None = None
    reason: str | None = None
    decision_id: str | None = None
    device: str | None = None
    route: str | None = None
    ts_ms: int | None = None
    details: Mapping[str, Scalar] = field(default_factory=lambda: MappingProxyType({}))


def ceremony(
    *,
    kind: str,
    outcome: str,
    user: str,
    session: str | None,
    level: str | None,
    decision_id: str,
    now_ms: int,
    reason: str | None = None,
    rule: str | None = None,
    credential: Credential | None = None,
    clone_suspected: bool = False,
    route: str | None = None,
    device: str | None = None,
) -> PasskeyRecord:
    details: dict[str, Scalar] = {"ceremony": kind}
    if credential is not None:
        details["credential_id"] = credential.id_b64
        details["aaguid"] = credential.aaguid
    if rule is not None:
        details["rule"] = rule
    if clone_suspected:
        details["clone_suspected"] = True
    return PasskeyRecord(
        type=CEREMONY,
        outcome=outcome,
        user=user,
        session=session,
        level=level,
        reason=reason,
        decision_id=decision_id,
        route=route,
        device=device,
        ts_ms=now_ms,
        details=MappingProxyType(details),
    )


def enrolled(
    cred: Credential, *, session: str | None, decision_id: str, now_ms: int
) -> PasskeyRecord:
    doc = cred.to_json()
    details: dict[str, Scalar] = {
        "credential_id": doc["credential_id"],
        "public_key": doc["public_key"],
        "aaguid": cred.aaguid,
        "sign_count": cred.sign_count,
        "issuer": cred.issuer,
        "subject": cred.subject,
        "rp_id": cred.rp_id,
        "created_at": cred.created_at,
        "credential_name": cred.name,
        "backup_eligible": cred.backup_eligible,
        "backup_state": cred.backup_state,
        "transports": ",".join(cred.transports),
        "attestation_fmt": cred.attestation_fmt,
        "certified": cred.certified,
        "user_verified": cred.user_verified,
        "enrolled_level": cred.enrolled_level,
    }
    return PasskeyRecord(
        type=ENROLLED,
        outcome=Reason.SUCCESS,
        user=f"{cred.issuer}|{cred.subject}",
        session=session,
        level=cred.enrolled_level,
        decision_id=decision_id,
        ts_ms=now_ms,
        details=MappingProxyType(details),
    )


def removed(
    cred: Credential, *, by: str, session: str | None, decision_id: str, now_ms: int
) -> PasskeyRecord:
    details: dict[str, Scalar] = {
        "credential_id": cred.id_b64,
        "public_key": b64u(cred.public_key),
        "aaguid": cred.aaguid,
        "issuer": cred.issuer,
        "subject": cred.subject,
        "removed_by": by,
    }
    return PasskeyRecord(
        type=REMOVED,
        outcome=Reason.SUCCESS,
        user=f"{cred.issuer}|{cred.subject}",
        session=session,
        decision_id=decision_id,
        ts_ms=now_ms,
        details=MappingProxyType(details),
    )


def to_audit_event(record: PasskeyRecord) -> AuditEvent:
    """The audit event for ``record``: the only coupling to ``authz.audit.events``
    (``passkey.enrolled``, ``passkey.removed``, ``passkey.ceremony``)."""
    etype = EventType(record.type)
    kwargs: dict[str, Any] = {}
    if record.ts_ms is not None:
        kwargs["ts_ms"] = record.ts_ms
    return AuditEvent(
        type=etype,
        decision_id=record.decision_id,
        user=record.user,
        session=record.session,
        device=record.device,
        route=record.route,
        level=record.level,
        outcome=record.outcome,
        reason=record.reason,
        factor=FACTOR,
        details=record.details,
        **kwargs,
    )


def credential_from_record(rec: Mapping[str, Any]) -> Credential:
    """The credential an enrolment record (as archived: flat JSON) describes."""
    transports = rec.get("transports") or ""
    if not isinstance(transports, str):
        raise ValueError("transports must be a string")
    return Credential.from_json(
        {
            "v": 1,
            "credential_id": rec.get("credential_id"),
            "public_key": rec.get("public_key"),
            "sign_count": rec.get("sign_count"),
            "aaguid": rec.get("aaguid"),
            "issuer": rec.get("issuer"),
            "subject": rec.get("subject"),
            "rp_id": rec.get("rp_id"),
            "created_at": rec.get("created_at"),
            "name": rec.get("credential_name"),
            "backup_eligible": rec.get("backup_eligible", False),
            "backup_state": rec.get("backup_state", False),
            "transports": [t for t in transports.split(",") if t],
            "attestation_fmt": rec.get("attestation_fmt"),
            "certified": rec.get("certified", False),
            "user_verified": rec.get("user_verified", False),
            "enrolled_level": rec.get("enrolled_level"),
            "enrolled_session": rec.get("session"),
        }
    )


@dataclass
class Replay:
    credentials: list[Credential] = field(default_factory=list)
    enrolments: int = 0
    removals: int = 0
    malformed: int = 0


def replay(records: Iterable[Mapping[str, Any]]) -> Replay:
    """The registry the archive describes: every enrolment, in archive order, unless a
    later removal names the same credential of the same user. Records of other types are
    ignored; a malformed enrolment is counted and skipped."""
    live: dict[tuple[str, str, bytes], Credential] = {}
    out = Replay()
    for rec in records:
        kind = rec.get("type")
        if kind == ENROLLED and rec.get("outcome") == Reason.SUCCESS:
            try:
                cred = credential_from_record(rec)
            except ValueError:
                out.malformed += 1
                continue
            live[(cred.issuer, cred.subject, cred.credential_id)] = cred
            out.enrolments += 1
        elif kind == REMOVED and rec.get("outcome") == Reason.SUCCESS:
            try:
                cid = unb64u(str(rec.get("credential_id")))
            except ValueError:
                out.malformed += 1
                continue
            if live.pop((str(rec.get("issuer")), str(rec.get("subject")), cid), None):
                out.removals += 1
    out.credentials = list(live.values())
    return out
