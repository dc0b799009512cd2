"""Errors raised by stepup-authz, each with a stable ``code``.

StepupError                 base; ``code`` is a stable slug
├── ConfigError             settings or policy refused at load (file, location, reason)
│   └── PolicyError         the policy document is invalid
├── RequestError            the request cannot be evaluated (e.g. a path that does not
│                           canonicalise); maps to a deny
├── TokenError              a presented token is not acceptable; ``reason`` says why
│   └── KeysUnavailable     no verification keys could be obtained (fail closed)
│       └── IntrospectionUnavailable  RFC 7662 introspection failed or timed out
├── StoreError              the session store failed or missed its deadline (fail closed)
└── OidcError               the step-up round trip failed (state, code exchange, ID token)
"""

from __future__ import annotations


class StepupError(Exception):
    code = "stepup-error"


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
    code = "bad-request"

    def __init__(self, message: str, *, reason: str = "bad-request") -> None:
        self.reason = reason
        super().__init__(message)


class TokenError(StepupError):
    """A token failed verification. ``reason`` is a Reason slug (token-invalid, token-expired)."""

    code = "token-invalid"

    def __init__(self, message: str, *, reason: str = "token-invalid") -> None:
        self.reason = reason
        super().__init__(message)


class KeysUnavailable(TokenError):
    """``retry_after_s``: when known, the seconds after which a retry can succeed (a JWKS
    refetch held back by its rate limit); for a ``Retry-After`` header."""

    code = "keys-unavailable"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, reason="keys-unavailable")


class IntrospectionUnavailable(KeysUnavailable):
    """The introspection endpoint failed, timed out or is saturated: fail closed."""

    code = "introspection-unavailable"


class StoreError(StepupError):
    code = "session-store-unavailable"


class OidcError(StepupError):
    code = "oidc-error"

    def __init__(self, message: str, *, reason: str = "oidc-error") -> None:
        self.reason = reason
        super().__init__(message)
