"""Settings of the Sessions API (``api:`` in the settings file).

The API is served on a listener of its own (never the ext_authz port). Each caller --
a factor service or an operator tool -- is named, authenticated on its own (one mTLS
identity, by URI or DNS subject alternative name, never the certificate's CN; or one bearer
secret), and limited to its scopes: which operations, the highest level it may grant, the
issuers, acr and amr values it may assert. A grant also needs a signed proof from that
caller (``proof``): a transport credential alone cannot mint a grant.

    api:
      enabled: true
      port: 9194
      tls: {cert_file: ..., key_file: ..., client_ca_file: ...}   # mTLS
      callers:
        - name: push-mfa
          mtls_names: ["spiffe://firm.example/ns/mfa/sa/push"]
          operations: [record-grant]
          max_level: elevated
          issuers: ["https://idp.example.com"]
          acr: [mfa]
          amr: [otp, mfa]
          proof: {issuer: push-mfa, jwks_file: /etc/stepup-authz/callers/push-mfa.jwks}
        - name: helpdesk
          bearer_secret_file: /run/secrets/helpdesk-api
          operations: [list, revoke]
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class Operation(StrEnum):
    RECORD_GRANT = "record-grant"
    REVOKE = "revoke"  # RevokeSession and RevokeUser
    LIST = "list"  # ListSessions


class ApiTls(BaseModel):
    model_config = _FROZEN
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # set => mTLS: callers present a certificate from it


class ProofSettings(BaseModel):
    """How a caller's grant proofs are verified: JWTs signed with the caller's own keys
    (its public JWKS), ``iss`` = ``issuer``, ``aud`` = ``api.audience``."""

    model_config = _FROZEN
    issuer: str = Field(min_length=1)
    jwks_file: Path
    algorithms: tuple[str, ...] = ("ES256", "EdDSA", "RS256")
    max_lifetime_s: int = Field(300, ge=1, le=3600)  # exp - iat of one proof, at most


class CallerSettings(BaseModel):
    model_config = _FROZEN
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    mtls_names: tuple[str, ...] = ()  # URI or DNS SANs of the caller's certificate
    bearer_secret_file: Path | None = None
    operations: tuple[Operation, ...] = Field(min_length=1)
    max_level: str | None = None  # the strongest level it may grant (record-grant)
    issuers: tuple[str, ...] = ()  # user issuers it may grant for (each a configured IdP)
    acr: tuple[str, ...] = ()  # acr values it may assert
    amr: tuple[str, ...] = ()  # amr values it may assert
    proof: ProofSettings | None = None
    rate_per_minute: int = Field(600, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _complete(self) -> CallerSettings:
        if bool(self.mtls_names) == (self.bearer_secret_file is not None):
            raise ValueError(f"caller {self.name}: give one of mtls_names or bearer_secret_file")
        if Operation.RECORD_GRANT in self.operations:
            missing = [n for n in ("max_level", "issuers", "acr", "proof") if not getattr(self, n)]
            if missing:
                raise ValueError(
                    f"caller {self.name} may record grants: it also needs {', '.join(missing)}"
                )
        return self


class ApiSettings(BaseModel):
    """The Sessions API (RecordGrant, RevokeSession, RevokeUser, ListSessions)."""

    model_config = _FROZEN
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9194, ge=0, le=65535)
    tls: ApiTls | None = None
    reflection: bool = False  # gRPC server reflection on this listener
    audience: str = "stepup-authz-api"  # the `aud` every grant proof must carry
    callers: tuple[CallerSettings, ...] = ()
    # The former single shared credential: refused with a pointer to `callers`.
    allowed_peers: None = None
    bearer_secret_file: None = None

    @field_validator("allowed_peers", "bearer_secret_file", mode="before")
    @classmethod
    def _gone(cls, v: object) -> None:
        if v is not None:
            raise ValueError(
                "one credential for every caller is no longer accepted: list each caller "
                "under api.callers with its own mTLS name or secret, scopes and proof keys"
            )
        return None

    @model_validator(mode="after")
    def _callers(self) -> ApiSettings:
        if self.enabled and not self.callers:
            raise ValueError("api.enabled needs at least one entry in api.callers")
        names = [c.name for c in self.callers]
        if len(set(names)) != len(names):
            raise ValueError("api.callers: names must be unique")
        seen: set[str] = set()
        for c in self.callers:
            if seen & set(c.mtls_names):
                raise ValueError(f"caller {c.name}: an mTLS name is given to two callers")
            seen |= set(c.mtls_names)
        if any(c.mtls_names for c in self.callers) and (
            self.tls is None or self.tls.client_ca_file is None
        ):
            raise ValueError("callers identified by mTLS need api.tls with client_ca_file")
        bearer = [c.name for c in self.callers if c.bearer_secret_file is not None]
        if bearer and self.tls is None and not _loopback(self.host):
            raise ValueError(
                f"callers {', '.join(bearer)} send a bearer secret: on {self.host} it would "
                "cross the network in clear; configure api.tls or listen on loopback"
            )
        return self


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
