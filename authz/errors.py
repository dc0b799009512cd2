"""Errors raised by stepup-authz, each with a stable ``code``.

StepupError                 base; ``code`` is a stable slug
├── ConfigError             settings or policy refused at load (file, location, reason)
│   └── PolicyError         the policy document is invalid
├── RequestError            the request cannot be evaluated (e.g. a path that does not
│                           canonicalise); maps to a deny with its ``reason``
├── TokenError              a presented token is not acceptable; ``reason`` says why
│   └── KeysUnavailable     no verification keys could be obtained (fail closed)
│       └── IntrospectionUnavailable  RFC 7662 introspection failed or timed out
├── StoreError              the session store failed or missed its deadline (fail closed)
└── OidcError               the step-up round trip failed (state, code exchange, ID token)

Codes and reasons that are also decision reasons come from ``authz.core.reasons``.
"""

from __future__ import annotations

from authz.core.reasons import Reason


class StepupError(Exception):
    code: str = "stepup-error"


class ConfigError(StepupError):
    code = "config-error"

    def __init__(self, message: str, *, source: str = "", location: str = "") -> None:
        self.source = source
        self.location = location
        self.reason = message
        where = ":".join(p for p in (source, location) if p)
        super().__init__(f"{where}: {message}" if where else message)


class PolicyError(ConfigError):
    code = "policy-error"


class RequestError(StepupError):
    code = Reason.BAD_REQUEST

    def __init__(self, message: str, *, reason: Reason = Reason.BAD_REQUEST) -> None:
        self.reason = reason
        super().__init__(message)


class TokenError(StepupError):
    """A token failed verification. ``reason``: token-invalid, token-expired, ..."""

    code = Reason.TOKEN_INVALID

    def __init__(self, message: str, *, reason: Reason = Reason.TOKEN_INVALID) -> None:
        self.reason = reason
        super().__init__(message)


class KeysUnavailable(TokenError):
    """``retry_after_s``: when known, the seconds after which a retry can succeed (a JWKS
    refetch held back by its rate limit); for a ``Retry-After`` header."""

    code = Reason.KEYS_UNAVAILABLE

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, reason=Reason.KEYS_UNAVAILABLE)


class IntrospectionUnavailable(KeysUnavailable):
    """The introspection endpoint failed, timed out or is saturated: fail closed."""

    code = Reason.INTROSPECTION_UNAVAILABLE


class StoreError(StepupError):
    code = Reason.SESSION_STORE_UNAVAILABLE


class OidcError(StepupError):
    code = Reason.OIDC_ERROR

    def __init__(self, message: str, *, reason: Reason = Reason.OIDC_ERROR) -> None:
        self.reason = reason
        super().__init__(message)
