"""Reason codes.

One slug per reason, reused verbatim as the ``reason`` metric label, the audit record's
reason and the ``x-stepup-reason`` response header, so the three can be joined.
Policy rules may add their own deny reasons (validated slugs); those are plain strings.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    ALLOWED = "allowed"
    PUBLIC = "public"
    # identity
    NO_CREDENTIALS = "no-credentials"
    TOKEN_INVALID = "token-invalid"  # noqa: S105 - a reason slug, not a secret
    TOKEN_EXPIRED = "token-expired"  # noqa: S105 - a reason slug, not a secret
    # step-up
    ACR_INSUFFICIENT = "acr-insufficient"
    AUTH_TOO_OLD = "auth-too-old"
    GRANT_BOUND_ELSEWHERE = "grant-bound-elsewhere"  # a grant exists for another device/IP
    SESSION_REVOKED = "session-revoked"
    # context
    IP_NOT_ALLOWED = "ip-not-allowed"  # the level's ip_allow / ip_deny lists
    # request shape
    BAD_PATH = "bad-path"
    BAD_REQUEST = "bad-request"
    # configuration
    UNKNOWN_LEVEL = "unknown-level"
    # fail-closed causes
    SESSION_STORE_UNAVAILABLE = "session-store-unavailable"
    KEYS_UNAVAILABLE = "keys-unavailable"
    INTERNAL_ERROR = "internal-error"
    DEADLINE_EXCEEDED = "deadline-exceeded"
    AUDIT_UNAVAILABLE = "audit-unavailable"  # audit-before-access record not durably accepted
