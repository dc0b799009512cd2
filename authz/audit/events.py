"""Audit event types, the record model and the canonical JSON encoding.

A record is a flat JSON object of strings, integers, booleans and nulls. Its canonical
bytes are ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` with DEL
(0x7f) escaped as well, so every C0 control character, DEL, every C1 control character, the
line separators U+2028/U+2029 and all other non-ASCII text appear as ``\\uXXXX`` escapes:
one record is always exactly one line of printable ASCII, whatever a client put in a path,
a device id or a header. Floats are refused (their text form is not canonical).

Never put a token, a cookie, an authorization code or a query string in an event: the
builders in :mod:`authz.audit.mapping` take the route as method, host and canonical path only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from authz.core.ids import new_id

RECORD_VERSION = 1
# One field longer than this is cut, with a marker, so a hostile path cannot bloat the trail.
MAX_FIELD_CHARS = 2048
_TRUNCATED = "...[truncated]"

Scalar = str | int | bool | None


class EventType(StrEnum):
    """Stable event type strings: part of the record format, never renamed."""

    STEPUP_CHALLENGE = "stepup.challenge"
    STEPUP_COMPLETED = "stepup.completed"
    LOGIN_REQUIRED = "login.required"
    TOKEN_REJECTED = "token.rejected"  # noqa: S105 - an event type, not a secret
    ACCESS_ALLOWED = "access.allowed"
    ACCESS_DENIED = "access.denied"
    ERROR_FAIL_CLOSED = "error.fail_closed"
    POLICY_RELOAD = "policy.reload"
    GRANT_REVOKED = "grant.revoked"
    # Authentication events of the step-up flow, the logout paths, passkeys and the
    # Sessions API (builders in authz.audit.mapping; docs/audit.md lists their fields).
    LOGIN_COMPLETED = "login.completed"
    STEPUP_STARTED = "stepup.started"
    STEPUP_FAILED = "stepup.failed"
    STEPUP_CANCELLED = "stepup.cancelled"
    LOGOUT = "logout"
    GRANT_RECORDED = "grant.recorded"
    SESSIONS_LISTED = "sessions.listed"
    PASSKEY_ENROLLED = "passkey.enrolled"
    PASSKEY_REMOVED = "passkey.removed"
    PASSKEY_CEREMONY = "passkey.ceremony"
    CIBA_STARTED = "ciba.started"
    CIBA_COMPLETED = "ciba.completed"
    CIBA_FAILED = "ciba.failed"
    # The trail's own records: a producer's start, idle heartbeat and clean stop (written by
    # the producer, MAC'd like every record), and what the exporter found (written by the
    # exporter into the archive: never taken from the stream).
    PRODUCER_STARTED = "audit.producer_started"
    PRODUCER_HEARTBEAT = "audit.producer_heartbeat"
    PRODUCER_STOPPED = "audit.producer_stopped"
    PRODUCER_SILENT = "audit.producer_silent"
    SEQUENCE_GAP = "audit.gap"
    QUARANTINED = "audit.quarantined"
    MALFORMED = "audit.malformed"


# The common fields, in the order the CSV export uses. ``details`` holds per-type extras
# (result, acr, auth_time, issuer, grant_*, old_sha256, new_sha256 ...).
COMMON_FIELDS: tuple[str, ...] = (
    "event_id",
    "ts_ms",
    "type",
    "decision_id",
    "user",
    "session",
    "device",
    "client_ip",
    "route",
    "level",
    "outcome",
    "reason",
    "factor",
    "policy_version",
)


def new_event_id(now_ms: int | None = None) -> str:
    """A ULID (``authz.core.ids``): the same scheme as decision ids."""
    return new_id(int(time.time() * 1000) if now_ms is None else now_ms)


def clip_text(value: str) -> str:
    """A string longer than ``MAX_FIELD_CHARS`` cut, with a marker."""
    if len(value) > MAX_FIELD_CHARS:
        return value[: MAX_FIELD_CHARS - len(_TRUNCATED)] + _TRUNCATED
    return value


# Integers a verifier in any language reads exactly (an IEEE double's safe range, as
# RFC 8785 numbers): epoch milliseconds and counters fit with room to spare.
MAX_SAFE_INT = 2**53 - 1


def _check_scalar(name: str, value: object) -> Scalar:
    if isinstance(value, str):
        return clip_text(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            return value
        raise ValueError(f"audit field {name!r}: {value} is outside +-(2**53 - 1)")
    raise TypeError(f"audit field {name!r}: {type(value).__name__} is not a str/int/bool/None")


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit event, as the service produces it (before the archive adds its chain)."""

    type: EventType
    event_id: str = field(default_factory=new_event_id)
    ts_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    decision_id: str | None = None
    user: str | None = None  # "iss|sub"
    session: str | None = None  # the session key hash, never the raw sid
    device: str | None = None
    client_ip: str | None = None
    route: str | None = None  # "METHOD host /canonical/path", never the query
    level: str | None = None
    outcome: str | None = None
    reason: str | None = None
    factor: str | None = None
    policy_version: str | None = None
    details: Mapping[str, Scalar] = field(default_factory=lambda: MappingProxyType({}))

    def to_record(self) -> dict[str, Scalar]:
        """The flat record: common fields (nulls kept, so every record has every column)
        plus the details, each prefixed by nothing (names must not clash)."""
        rec: dict[str, Scalar] = {"v": RECORD_VERSION}
        for name in COMMON_FIELDS:
            value = getattr(self, name)
            rec[name] = _check_scalar(name, str(value) if name == "type" else value)
        for name, value in self.details.items():
            if name in rec or name in ARCHIVE_FIELDS:
                raise ValueError(f"audit detail {name!r} clashes with a record field")
            rec[name] = _check_scalar(name, value)
        return rec


# Fields the archive adds around an event record (see authz.audit.chain).
# ``producer`` / ``producer_seq``: who wrote a stream record and its sequence number, as the
# exporter verified them (the entry's MAC'd p and n fields).
ARCHIVE_FIELDS: frozenset[str] = frozenset(
    {
        "kind",
        "seq",
        "stream_id",
        "prev_hash",
        "hash",
        "segment",
        "key_id",
        "sig",
        "producer",
        "producer_seq",
    }
)


# One encoder, configured once (json.dumps with these options builds a new one per call).
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
)


def canonical_bytes(record: Mapping[str, Any]) -> bytes:
    """The canonical encoding: sorted keys, no spaces, ASCII only, no raw control chars."""
    text = _CANONICAL.encode(record)
    # ensure_ascii escapes U+0000-U+001F and everything above U+007E; DEL is escaped too
    # (kept explicit: the format promises it whatever the json module does).
    return text.replace("\x7f", "\\u007f").encode("ascii")


def encode_event(event: AuditEvent) -> bytes:
    """An event's record, canonically encoded (the Check's audited allow is written by
    ``mapping.allowed_record``, held byte-equal to this)."""
    return canonical_bytes(event.to_record())


def decode_record(raw: bytes | str) -> dict[str, Any]:
    """Parse one record; raises ValueError when it is not a JSON object."""
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("an audit record must be a JSON object")
    return doc
