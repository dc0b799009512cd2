"""Reason codes: the only place a reason slug is written.

One slug per reason, reused verbatim as the ``reason`` metric label, the audit record's
reason and the ``x-stepup-reason`` response header, so the three can be joined. A test
(``tests/unit/test_reasons.py``) refuses a reason slug written as a string literal anywhere
else in ``authz/``.

Policy rules may name their own deny reasons (validated slugs in the policy file): a
Decision then carries ``Reason.RULE_DENIED`` and the rule's slug beside it
(``Decision.slug``), which is what the header, the metric and the audit record show.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # -- Check outcomes ---------------------------------------------------------------------
    ALLOWED = "allowed"
    PUBLIC = "public"
    # identity
    NO_CREDENTIALS = "no-credentials"
    TOKEN_INVALID = "token-invalid"  # noqa: S105 - a reason slug, not a secret
    TOKEN_EXPIRED = "token-expired"  # noqa: S105 - a reason slug, not a secret
    # step-up
    ACR_INSUFFICIENT = "acr-insufficient"
    AMR_INSUFFICIENT = "amr-insufficient"
    AUTH_TOO_OLD = "auth-too-old"
    GRANT_BOUND_ELSEWHERE = "grant-bound-elsewhere"  # a grant exists for another device/IP
    SESSION_REVOKED = "session-revoked"
    # context
    IP_NOT_ALLOWED = "ip-not-allowed"  # the level's ip_allow / ip_deny lists
    RULE_DENIED = "rule-denied"  # a policy rule's deny; its own slug is Decision.rule_reason
    # request shape
    BAD_PATH = "bad-path"
    BAD_REQUEST = "bad-request"
    # configuration
    UNKNOWN_LEVEL = "unknown-level"
    # fail-closed causes
    SESSION_STORE_UNAVAILABLE = "session-store-unavailable"
    KEYS_UNAVAILABLE = "keys-unavailable"
    INTROSPECTION_UNAVAILABLE = "introspection-unavailable"  # RFC 7662 endpoint failed
    INTERNAL_ERROR = "internal-error"
    DEADLINE_EXCEEDED = "deadline-exceeded"
    AUDIT_UNAVAILABLE = "audit-unavailable"  # audit-before-access record not durably accepted

    # -- grants (authz.core.grants): why a proof does not become a grant ---------------------
    SUCCESS = "success"  # a completed step-up / recorded grant (the completion's result)
    AUTH_TIME_MISSING = "auth-time-missing"
    AUTH_TIME_FUTURE = "auth-time-future"
    SUBJECT_MISMATCH = "subject-mismatch"  # someone else proved the factor
    ISSUER_MISMATCH = "issuer-mismatch"
    DEVICE_MISMATCH = "device-mismatch"  # a bound level completed from another device
    IP_MISMATCH = "ip-mismatch"  # ... or from another address
    DEVICE_REQUIRED = "device-required"  # a level bound to a device, and no device known
    IP_REQUIRED = "ip-required"
    LEVEL_UNKNOWN = "level-unknown"
    LEVEL_NOT_GRANTABLE = "level-not-grantable"  # a level that asks for no evidence

    # -- the step-up round trip (authz.stepup) -----------------------------------------------
    STATE_MISMATCH = "state-mismatch"  # state parameter and browser cookie differ
    STATE_INVALID = "state-invalid"  # unknown, expired or already used
    STATE_REPLAYED = "state-replayed"  # a state id that was already consumed once
    LINK_INVALID = "link-invalid"  # a step-up link without a valid signature, or expired
    LINK_OTHER_SESSION = "link-other-session"  # a link the Check issued for another session
    LINK_REUSED = "link-reused"  # a step-up link opened a second time
    ISS_MISSING = "iss-missing"  # RFC 9207: the IdP always sends iss, and this had none
    IDP_ERROR = "idp-error"  # the IdP answered with an error instead of a code
    CLAIMS_INVALID = "claims-invalid"
    TOKEN_REJECTED = "token-rejected"  # noqa: S105 - a reason slug, not a secret
    CODE_EXCHANGE_FAILED = "code-exchange-failed"
    IDP_UNAVAILABLE = "idp-unavailable"
    STORE_ERROR = "store-error"

    # -- passkeys (authz.stepup.passkeys): why a ceremony or an enrolment is refused ---------
    PASSKEY_NOT_OFFERED = "passkey-not-offered"  # the level does not list the passkey factor
    NO_CREDENTIAL = "no-credential"  # the user has no registered credential
    CREDENTIAL_UNKNOWN = "credential-unknown"  # not one of this user's credentials
    CHALLENGE_MISMATCH = "challenge-mismatch"  # clientData.challenge is not the one issued
    CEREMONY_TYPE_INVALID = "ceremony-type-invalid"  # webauthn.get vs webauthn.create
    ORIGIN_NOT_ALLOWED = "origin-not-allowed"
    RP_ID_MISMATCH = "rp-id-mismatch"  # rpIdHash is not SHA-256 of our RP ID
    USER_NOT_PRESENT = "user-not-present"  # the UP flag is clear
    USER_VERIFICATION_REQUIRED = "user-verification-required"  # the level needs UV
    COUNTER_REGRESSION = "counter-regression"  # WebAuthn 6.1.1: a possible cloned key
    SIGNATURE_INVALID = "signature-invalid"
    RESPONSE_INVALID = "response-invalid"  # malformed credential JSON / CBOR
    BACKUP_STATE_INVALID = "backup-state-invalid"  # BE changed, or BS without BE
    DEVICE_BOUND_REQUIRED = "device-bound-required"  # a synced passkey on a device-bound level
    AUTHENTICATOR_NOT_ALLOWED = "authenticator-not-allowed"  # AAGUID not listed nor certified
    ATTESTATION_INVALID = "attestation-invalid"  # the statement or its chain does not verify
    ENROLMENT_NOT_ALLOWED = "enrolment-not-allowed"  # no fresh step-up at the enrolment level
    ENROLLED_DURING_STEPUP = "enrolled-during-stepup"  # CVE-2023-3597: not for this step-up
    ENROLMENT_DURABILITY = "enrolment-durability"  # the credential Redis may lose data
    CREDENTIAL_EXISTS = "credential-exists"
    TOO_MANY_CREDENTIALS = "too-many-credentials"
    TRANSACTION_INVALID = "transaction-invalid"  # the signed transaction link does not verify
    # A transaction-bound level and no grant for exactly this request (its digest): the
    # token and time-boxed grants never satisfy one (authz.core.decision.with_transaction).
    TRANSACTION_REQUIRED = "transaction-required"
    ORIGIN_MISSING = "origin-missing"  # a state-changing POST without a same-origin Origin

    # -- push step-up, OpenID CIBA (authz.stepup.ciba) ----------------------------------------
    CIBA_NOT_OFFERED = "ciba-not-offered"  # the level needs what a push cannot give
    ACTION_NOT_COVERED = "action-not-covered"  # the action named does not need that level
    LOGIN_HINT_UNAVAILABLE = "login-hint-unavailable"  # the hint claim is not in the token
    RATE_LIMITED = "rate-limited"  # too many pushes for this session or user in the window
    CIBA_PENDING = "ciba-pending"  # a push is already pending for this session
    CIBA_UNKNOWN = "ciba-unknown"  # no such request, or it ended long ago
    CIBA_OTHER_SESSION = "ciba-other-session"  # a request id of another session presented
    CIBA_DENIED = "ciba-denied"  # the user refused on the authentication device
    CIBA_EXPIRED = "ciba-expired"  # not approved before the request expired
    CIBA_REPLAYED = "ciba-replayed"  # the IdP answered one auth_req_id with tokens twice

    # -- the Sessions API (authz.admin) -------------------------------------------------------
    ARGUMENT_INVALID = "argument-invalid"
    PROOF_INVALID = "proof-invalid"  # no proof, or one that does not verify
    PROOF_REPLAYED = "proof-replayed"  # a proof's jti used a second time
    OUT_OF_SCOPE = "out-of-scope"  # beyond what this caller may grant or assert
    API_REVOKE_SESSION = "api-revoke-session"
    API_REVOKE_USER = "api-revoke-user"

    # -- logout (authz.stepup.logout): why a logout token is refused ------------------------
    LOGOUT_TOKEN_INVALID = "logout-token-invalid"  # noqa: S105 - signature, iss, aud, times
    LOGOUT_EVENT_MISSING = "logout-event-missing"  # no back-channel logout member in `events`
    LOGOUT_NONCE_PRESENT = "logout-nonce-present"  # an ID token offered as a logout token
    LOGOUT_REPLAYED = "logout-replayed"  # a logout token's `jti` seen before
    LOGOUT_SUBJECT_MISSING = "logout-subject-missing"  # neither `sid` nor `sub` (or no `sub`)

    # -- error codes (authz.errors) that are not decisions -----------------------------------
    OIDC_ERROR = "oidc-error"

    # -- the step-up callback's precise refusals (audit records and log lines) ---------------
    # The metric label stays the coarse slug above (state-mismatch, state-invalid,
    # token-rejected); the audit record and the log line name which of these it was.
    STATE_MISSING = "state-missing"  # no state parameter, or a state this service holds not
    STATE_EXPIRED = "state-expired"  # a state this service issued, older than its TTL
    COOKIE_MISMATCH = "cookie-mismatch"  # a live state, but not this browser's cookie
    ID_TOKEN_REJECTED = "id-token-rejected"  # noqa: S105 - a reason slug, not a secret
    ACCESS_TOKEN_REJECTED = "access-token-rejected"  # noqa: S105 - the sign-in's access token
    USER_CANCELLED = "user-cancelled"  # the user left the step-up with the cancel link
    POLICY_INVALID = "policy-invalid"  # a policy reload refused; the last good one stays

    # -- request shape, later additions --------------------------------------------------------
    # A method not in its canonical (upper-case) form: methods are case-sensitive (RFC 9110
    # section 9.1) and so are Envoy's route matchers, so ``post`` is refused, never read as
    # ``POST`` (it would have skipped every Envoy route scoped to POST).
    METHOD_NOT_CANONICAL = "method-not-canonical"

    # -- overload (authz.check.authorizer) ---------------------------------------------------
    # A fail-closed cause: Envoy's deadline for the Check had passed before its session read
    # (it queued behind a stalled or saturated loop); refused without a Redis call.
    OVERLOADED = "overloaded"
