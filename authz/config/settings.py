"""Service configuration: one YAML file plus ``STEPUP_*`` / ``REDIS_URL`` environment
overrides, validated once into frozen objects.

Secrets are never inlined in the file in production: every secret field has a ``*_file``
twin (Kubernetes Secret mounts) and an environment variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from authz.admin.config import ApiSettings
from authz.audit.config import AuditSettings
from authz.config.validation import report
from authz.config.yamlfile import read_mapping
from authz.errors import ConfigError
from authz.stepup.passkeys.settings import PasskeySettings

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class TlsSettings(BaseModel):
    model_config = _FROZEN
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # set => mTLS: clients must present a cert from this CA


class GrpcSettings(BaseModel):
    model_config = _FROZEN
    host: str = "127.0.0.1"
    port: int = Field(9191, ge=0, le=65535)
    tls: TlsSettings | None = None
    # On SIGTERM: health goes NOT_SERVING, then new checks are still answered for
    # shutdown_delay_s (so Envoy and Kubernetes see it and route away), then the listener
    # stops and in-flight checks get up to shutdown_grace_s to finish.
    shutdown_delay_s: float = Field(1.0, ge=0)
    shutdown_grace_s: float = Field(5.0, ge=0)
    max_concurrent_rpcs: int | None = Field(None, ge=1)
    reflection: bool = False  # gRPC server reflection (advertises the services): opt-in
    # The header in which Envoy sends the client address it computed (render envoy sets
    # it to %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%, overwriting any client value); a
    # check without it is refused. null: Envoy's connection peer (attributes.source),
    # which is the client only when Envoy trusts no X-Forwarded-For hop.
    peer_header: str | None = "x-stepup-peer-address"


class HttpSettings(BaseModel):
    model_config = _FROZEN
    host: str = "127.0.0.1"
    port: int = Field(9192, ge=0, le=65535)
    # TLS on the /_stepup port (Envoy's cluster: `render envoy --service-tls-*`).
    tls: TlsSettings | None = None


class HttpAuthzSettings(BaseModel):
    """Envoy's HTTP ext_authz protocol (``render envoy --mode http``); off unless enabled."""

    model_config = _FROZEN
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9193, ge=0, le=65535)
    # Must equal http_service.path_prefix; routes raise their level with "<prefix>@<level>".
    path_prefix: str = Field("/check", pattern=r"^/[!-~]*[^/@]$")
    # Set by Envoy's headers_to_add to %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%.
    peer_header: str = "x-stepup-peer-address"
    # Envoy forwards only the allowed headers; cookies and tokens dominate the size.
    max_header_bytes: int = Field(64 * 1024, ge=1024, le=1024 * 1024)
    max_headers: int = Field(64, ge=8, le=1000)
    request_timeout_s: float = Field(5.0, gt=0)
    # Above the Envoy cluster's idle_timeout, so Envoy closes idle connections first.
    idle_timeout_s: float = Field(300.0, gt=0)
    max_connections: int = Field(1024, ge=1)
    shutdown_grace_s: float = Field(5.0, ge=0)
    # A request head (from a new connection's open, or a request's first byte) must be
    # complete within this; a head trickled byte by byte (slowloris) is refused at it.
    header_timeout_s: float = Field(5.0, gt=0)
    # One source address holds at most this many connections; past it (or past
    # max_connections) the longest-idle connection without a check in flight is closed
    # for the new one, so idle or trickling sockets cannot lock Envoy out.
    max_connections_per_source: int = Field(512, ge=1)
    # TLS (and with client_ca_file, mTLS) on this port; `render envoy --mode http
    # --service-tls-*` makes Envoy's check cluster speak it.
    tls: TlsSettings | None = None


def _host_port(node: str) -> str:
    host, sep, port = node.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{node!r} is not host:port")
    return node


class SentinelSettings(BaseModel):
    model_config = _FROZEN
    master_name: str = Field(min_length=1)
    nodes: tuple[str, ...] = Field(min_length=1)  # sentinel host:port list
    password_file: Path | None = None  # the sentinels' own password, when they have one
    ssl: bool = False

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_host_port(n) for n in v)


class ClusterSettings(BaseModel):
    model_config = _FROZEN
    nodes: tuple[str, ...] = Field(min_length=1)  # startup nodes, host:port
    ssl: bool = False

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_host_port(n) for n in v)


class RedisSettings(BaseModel):
    model_config = _FROZEN
    # One of url, sentinel or cluster; none of them => start an embedded Valkey server
    # (development, demo, tests).
    url: str | None = None
    sentinel: SentinelSettings | None = None
    cluster: ClusterSettings | None = None
    key_prefix: str = "stepup:"
    # Each Check's session read must finish well inside Envoy's ext_authz timeout.
    deadline_ms: int = Field(50, ge=1, le=10_000)
    password_file: Path | None = None
    ca_file: Path | None = None
    # The Check path's scripts over authz.store.fastredis (pipelined, hiredis) when the
    # topology is a plain url; Sentinel and Cluster always use redis-py.
    fast_client: bool = True
    fast_connections: int = Field(2, ge=1, le=64)

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @model_validator(mode="after")
    def _one_topology(self) -> RedisSettings:
        given = [n for n in ("url", "sentinel", "cluster") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of url, sentinel or cluster, not {' and '.join(given)}")
        return self

    @property
    def embedded(self) -> bool:
        return self.url is None and self.sentinel is None and self.cluster is None


IdpProfileName = Literal["generic", "okta", "entra", "keycloak", "ping"]


class AuthContextSettings(BaseModel):
    """One Entra Conditional Access authentication context and the policy acr it proves."""

    model_config = _FROZEN
    id: str = Field(pattern=r"^c([1-9]|[1-9][0-9])$")  # Entra names them c1..c99
    acr: str = Field(min_length=1, max_length=256)


class ProfileSettings(BaseModel):
    """The IdP profile (``authz.stepup.profiles``) and the parts of it overridden here.

    Every field left unset takes the profile's value; ``docs/idp/<name>.md`` lists them.
    """

    model_config = _FROZEN
    name: IdpProfileName = "generic"
    scope: tuple[str, ...] | None = None
    # RFC 8707 resource indicators sent with every authorization and token request.
    resource: tuple[str, ...] = ()
    claims_request: bool | None = None  # OIDC Core 5.5 `claims` with the level's needs
    send_acr_values: bool | None = None
    acr_claim: str | None = None
    amr_claim: str | None = None
    auth_time_claim: str | None = None
    sid_claim: str | None = None
    # "Same user" between the access token and the ID token: (access claim, ID claim).
    subject_claims: tuple[str, str] | None = None
    # Where an access token names its client (RFC 9068 client_id, azp, Okta cid, ...).
    client_claims: tuple[str, ...] | None = None
    challenge: Literal["rfc9470", "claims", "both"] | None = None
    # Entra: authentication contexts, weakest first; levels ask for them via `claims`.
    auth_contexts: tuple[AuthContextSettings, ...] = ()
    authorization_uri: str | None = None  # Entra claims challenge `authorization_uri`

    @field_validator("resource")
    @classmethod
    def _absolute(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for r in v:  # RFC 8707 section 2: an absolute URI without a fragment
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:[^#\s]+", r):
                raise ValueError(f"resource {r!r} is not an absolute URI without a fragment")
        return v


class IntrospectionSettings(BaseModel):
    """RFC 7662 token introspection for access tokens that are not JWTs (``authz.check.
    introspection``). Present means on; the client credentials default to the OIDC client's."""

    model_config = _FROZEN
    endpoint: str | None = None  # default: `introspection_endpoint` from discovery
    client_id: str | None = None
    client_secret: str | None = None
    client_secret_file: Path | None = None
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    # Each call must end well inside Envoy's ext_authz timeout; a late answer is a deny.
    timeout_ms: int = Field(150, ge=1, le=10_000)
    cache_ttl_s: int = Field(60, ge=0, le=3600)  # never beyond the token's own `exp`
    negative_cache_ttl_s: int = Field(5, ge=0, le=300)  # "inactive" answers
    cache_size: int = Field(10_000, ge=0, le=1_000_000)
    max_inflight: int = Field(32, ge=1, le=1024)  # beyond it: fail closed, not a queue
    # The answer's `aud` must contain oidc.audience. Off only with oidc.allowed_clients.
    require_audience: bool = True
    # `token_type` must say Bearer (a refresh token introspects as active too).
    require_token_type: bool = True
    jwt_tokens: bool = False  # introspect JWT access tokens as well (revocation at the IdP)

    def secret(self) -> str | None:
        if self.client_secret_file is not None:
            return self.client_secret_file.read_text().strip()
        return self.client_secret


class OidcSettings(BaseModel):
    model_config = _FROZEN
    issuer: str
    client_id: str
    client_secret: str | None = None
    client_secret_file: Path | None = None
    # Access tokens presented to the mesh must carry exactly this audience.
    audience: str
    # Fixed allowlist: the token's own `alg` header only selects within it.
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    jwks_url: str | None = None  # default: from the issuer's discovery document
    jwks_file: Path | None = None
    jwks_refresh_min_interval_s: float = Field(30.0, ge=0)
    jwks_timeout_s: float = Field(2.0, gt=0)
    # A token with an unknown `kid` waits this long for the JWKS refresh it triggers, then
    # is denied with keys-unavailable while the fetch goes on: the answer must reach Envoy
    # before its ext_authz timeout (250 ms in the shipped configs), not Envoy's bare 403.
    jwks_refresh_wait_ms: int = Field(100, ge=1, le=10_000)
    leeway_s: int = Field(30, ge=0, le=300)
    # Accepted access-token `typ` headers (RFC 9068 "at+jwt"; Keycloak and Entra send
    # "JWT"); null in the list accepts a token without `typ`. Unset: the profile's default.
    # Set to null: not checked.
    token_typ: tuple[str | None, ...] | None = None
    # When non-empty, access tokens must name one of these clients (client_id, azp, ...).
    allowed_clients: tuple[str, ...] = ()
    profile: ProfileSettings = ProfileSettings()
    introspection: IntrospectionSettings | None = None
    # The session's access token, set at sign-in (HttpOnly; removed from what Envoy
    # forwards upstream). "__Host-" is dropped when stepup.cookie_secure is false.
    token_cookie: str = "__Host-stepup-token"  # noqa: S105 - a cookie name, not a secret
    # More cookies that carry credentials and must never reach an upstream.
    credential_cookies: tuple[str, ...] = ()
    # When a token has no `sid`, the session is the token itself: a step-up made with one
    # token is not reused by another (another browser, a refreshed token). Naming a claim
    # here (e.g. "sub") makes every token with the same value one session: one step-up
    # then elevates all of them, on every device -- the service warns at start.
    sid_fallback_claim: str | None = None
    token_cache_size: int = Field(10_000, ge=0)
    http_timeout_s: float = Field(5.0, gt=0)
    # An IdP unreachable at start: the service starts degraded (not ready) and retries
    # discovery and the keys, the delay doubling from the first to the last value.
    start_retry_initial_s: float = Field(0.5, gt=0, le=60)
    start_retry_max_s: float = Field(30.0, gt=0, le=600)

    @field_validator("algorithms")
    @classmethod
    def _algs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        allowed = {
            "RS256",
            "RS384",
            "RS512",
            "PS256",
            "PS384",
            "PS512",
            "ES256",
            "ES384",
            "ES512",
            "EdDSA",
        }
        bad = [a for a in v if a not in allowed]
        if bad or not v:
            raise ValueError(f"asymmetric algorithms only; refused: {bad or 'empty list'}")
        return v

    @field_validator("token_typ", mode="before")
    @classmethod
    def _typ_list(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("profile", mode="before")
    @classmethod
    def _profile_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _introspection_binding(self) -> OidcSettings:
        i = self.introspection
        if i is not None and not i.require_audience and not self.allowed_clients:
            raise ValueError(
                "introspection.require_audience is off: set oidc.allowed_clients, or any "
                "active token of this IdP would be accepted"
            )
        return self

    @property
    def token_typ_set(self) -> bool:
        """Whether ``token_typ`` was given (else the profile's default applies)."""
        return "token_typ" in self.model_fields_set

    def secret(self) -> str | None:
        if self.client_secret_file is not None:
            return self.client_secret_file.read_text().strip()
        return self.client_secret


class StepupSettings(BaseModel):
    model_config = _FROZEN
    # The origin users reach the mesh on; the OIDC redirect_uri is built from it.
    public_url: str = "http://127.0.0.1:8080"
    path_prefix: str = "/_stepup"
    landing_path: str = "/"
    state_ttl_s: int = Field(300, ge=30, le=3600)
    state_cookie: str = "__Host-stepup-state"
    cookie_secure: bool = True
    # Grants last the level's max_age; levels without one get this.
    default_grant_ttl_s: int = Field(900, ge=1)
    # Status for internal errors: 403, or 503 where a retry is the better signal.
    error_status: Literal[403, 503] = 403
    # HMAC key (>= 32 bytes) signing the device/IP context in the start link; shared by
    # all replicas. Without it each process makes its own (single-replica setups only).
    context_key_file: Path | None = None

    # The header Envoy's /_stepup/ route sets to the client address it sees
    # (%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%); the callback compares it with the
    # address a bound level's challenge was issued to.
    peer_header: str = "x-stepup-peer-address"
    # The browser step-up endpoints' Redis deadline. Nothing there waits on Envoy's
    # ext_authz timeout (the Check's redis.deadline_ms, a few ms): a loaded Redis gets a
    # second before a sign-in page says "temporarily unavailable".
    store_deadline_ms: int = Field(1000, ge=1, le=10_000)

    @field_validator("public_url")
    @classmethod
    def _no_slash(cls, v: str) -> str:
        return v.rstrip("/")

    def cookie(self, name: str) -> str:
        """A cookie's name as set: a "__Host-" prefix needs Secure, so a plain-http
        deployment (the demo) drops it."""
        return name if self.cookie_secure else name.removeprefix("__Host-")


class CibaSettings(BaseModel):
    """Push step-up for API clients through the IdP's OpenID CIBA endpoint, poll mode
    (``authz.stepup.ciba``, docs/ciba.md). Off unless enabled; the OIDC client's
    credentials authenticate the service at the IdP, as for the code exchange."""

    model_config = _FROZEN
    enabled: bool = False
    # Default: `backchannel_authentication_endpoint` from the IdP's discovery document.
    endpoint: str | None = None
    # `requested_expiry` sent to the IdP, and the most a request is tracked whatever the
    # IdP's `expires_in`; a client may ask for less (its own `requested_expiry`).
    max_expiry_s: int = Field(120, ge=10, le=600)
    # CIBA Core 1.0 section 7.3: an IdP that names no `interval` means 5 seconds.
    default_interval_s: int = Field(5, ge=1, le=60)
    # Poll bounds: never faster than min_interval_s whatever the IdP says; after IdP errors
    # the service backs off, doubling, up to max_interval_s (an IdP's own interval or
    # slow_down is honoured even above it: never poll faster than the IdP asks).
    min_interval_s: int = Field(1, ge=1, le=60)
    max_interval_s: int = Field(30, ge=1, le=600)
    # The claim of the verified access token sent as `login_hint`; default: the profile's
    # user claim (`sub`; `uid` for Okta). Never anything the client sends.
    login_hint_claim: str | None = Field(None, min_length=1, max_length=64)
    # The binding message (a short code and the action) shown on the user's device:
    # oidc-provider's default accepts 20 characters of [A-Za-z0-9-._+/!?#].
    binding_message_chars: int = Field(20, ge=12, le=64)
    # Push bombing: starts per session and per user in a fixed window, and at most one
    # pending request per session.
    rate_window_s: int = Field(600, ge=10, le=86_400)
    max_per_session: int = Field(3, ge=1, le=100)
    max_per_user: int = Field(10, ge=1, le=1000)
    # Requests this process polls at once (a start beyond it is refused, 503); the outcome
    # stays readable this long after a request ends.
    max_pending: int = Field(1000, ge=1, le=100_000)
    max_inflight_polls: int = Field(16, ge=1, le=256)
    result_ttl_s: int = Field(300, ge=10, le=3600)

    @model_validator(mode="after")
    def _bounds(self) -> CibaSettings:
        if self.min_interval_s > self.max_interval_s:
            raise ValueError("ciba.min_interval_s must be <= ciba.max_interval_s")
        if self.max_per_session > self.max_per_user:
            raise ValueError("ciba.max_per_session must be <= ciba.max_per_user")
        return self


class LogoutSettings(BaseModel):
    """Logout (``authz.stepup.logout``, docs/idp/generic.md): OIDC Back-Channel Logout 1.0
    at ``<path_prefix>/backchannel-logout`` and the RP-initiated ``<path_prefix>/logout``."""

    model_config = _FROZEN
    backchannel: bool = True
    # A logout token older than this (its `iat`) is refused; its `jti` is remembered that
    # long (plus the leeway), so a replay is refused for as long as the token is accepted.
    max_token_age_s: int = Field(300, ge=10, le=3600)
    # A logout token naming a `sid` this service never saw as a session (access tokens
    # without `sid`: sessions are then keyed by the token): "user" ends all of that
    # user's sessions, as a logout by `sub` does; "session" ends only the named one.
    unknown_sid: Literal["user", "session"] = "user"
    # Where the IdP may send the browser after RP-initiated logout: exact URLs, the first
    # is the default; the logout form may only pick one of these. Empty: none is sent.
    post_logout_redirect_uris: tuple[str, ...] = ()

    @field_validator("post_logout_redirect_uris")
    @classmethod
    def _absolute(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for uri in v:
            if not uri.startswith(("https://", "http://")) or any(ord(c) < 0x21 for c in uri):
                raise ValueError(f"not an absolute http(s) URL: {uri!r}")
        return v


class DeviceAssertionSettings(BaseModel):
    """A signed device assertion (JWT) from an MDM / device-trust service."""

    model_config = _FROZEN
    header: str = "x-device-assertion"
    issuer: str
    audience: str = "stepup-authz"
    algorithms: tuple[str, ...] = ("ES256", "RS256")
    jwks_url: str | None = None
    jwks_file: Path | None = None
    # An assertion must be short-lived (exp - iat) and carry a jti; the same jti from
    # another client address is a replay.
    max_lifetime_s: int = Field(300, ge=10, le=3600)

    @model_validator(mode="after")
    def _keys(self) -> DeviceAssertionSettings:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("give one of jwks_url or jwks_file")
        return self


class DeviceSettings(BaseModel):
    model_config = _FROZEN
    # The device cookie the service issues after a completed step-up (random, MAC'd with
    # a key derived from stepup.context_key_file); None disables device cookies.
    cookie: str | None = "__Host-stepup-device"
    assertion: DeviceAssertionSettings | None = None
    # Client certificates (mTLS) become device ids only when they chain to this CA and
    # are within their validity. Without it, certificates are not device identities.
    certificate_ca_file: Path | None = None


class StateSettings(BaseModel):
    """Retention of the per-user state in Redis (see the README's Redis footprint)."""

    model_config = _FROZEN
    session_ttl_s: int = Field(86_400, ge=60)  # >= the longest access-token lifetime
    # Revocation markers are kept this long: at least the longest session (with its
    # refreshed tokens) the IdP allows. A marker that expires lets older tokens back in.
    revocation_ttl_s: int = Field(30 * 86_400, ge=60)
    history_ttl_s: int = Field(90 * 86_400, ge=3600)  # known devices / IPs, levels seen
    max_sessions: int = Field(50, ge=1, le=1000)
    max_devices: int = Field(20, ge=1, le=1000)
    max_ips: int = Field(50, ge=1, le=1000)

    @model_validator(mode="after")
    def _revocations_outlive_sessions(self) -> StateSettings:
        if self.revocation_ttl_s < self.session_ttl_s:
            raise ValueError("state.revocation_ttl_s must be >= state.session_ttl_s")
        return self


class CryptoSettings(BaseModel):
    """Encryption of sensitive Redis values (``authz.store.crypto``). No keys: a random
    per-process key, with a warning (development only); ``require`` refuses that."""

    model_config = _FROZEN
    # kid -> file holding 32 random bytes, raw or base64 (a Kubernetes Secret mount).
    # Keep a retired kid here until data written under it has expired (history_ttl_s).
    keys: dict[str, Path] = {}
    active_kid: str | None = None  # new values are written under this kid
    # The kid active before the last rotation: known devices / IPs recorded under its
    # lookup key still match (and move to the active kid when seen).
    previous_kid: str | None = None
    require: bool = False  # production: refuse to start without keys

    @model_validator(mode="after")
    def _ring(self) -> CryptoSettings:
        bad = [k for k in self.keys if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", k)]
        if bad:
            raise ValueError(f"key ids must match [A-Za-z0-9_-]{{1,32}}: {bad}")
        if self.keys and self.active_kid is None:
            raise ValueError("crypto.keys is set but crypto.active_kid is not")
        if self.active_kid is not None and self.active_kid not in self.keys:
            raise ValueError(f"crypto.active_kid {self.active_kid!r} is not in crypto.keys")
        if self.previous_kid is not None and (
            self.previous_kid not in self.keys or self.previous_kid == self.active_kid
        ):
            raise ValueError("crypto.previous_kid must be another kid of crypto.keys")
        if self.require and self.active_kid is None:
            raise ValueError("crypto.require is set: configure crypto.keys and active_kid")
        return self


class NetworkSettings(BaseModel):
    """The client address is Envoy's own (authz/check/request.py): the proxies Envoy trusts
    in X-Forwarded-For are Envoy's setting alone, never the service's."""

    model_config = _FROZEN
    # A MaxMind DB (GeoIP2/GeoLite2 City or Country) for country rules and travel.
    geoip_database: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_second_derivation(cls, data: Any) -> Any:
        if isinstance(data, dict) and "trusted_xff_hops" in data:
            raise ValueError(
                "network.trusted_xff_hops is no longer a service setting: the service uses "
                "the client address Envoy computed. Set the hop count in Envoy instead "
                "(render envoy --xff-num-trusted-hops N, Envoy's xff_num_trusted_hops; "
                "Istio numTrustedProxies; Envoy Gateway numTrustedHops) and remove this key"
            )
        return data


class CoverageSettings(BaseModel):
    """The periodic mesh coverage check (``authz.evidence.monitor``): off with no URLs."""

    model_config = _FROZEN
    # Envoy admin addresses (http://host:port) whose /config_dump is read.
    envoy_admin_urls: tuple[str, ...] = ()
    interval_s: float = Field(300.0, ge=5)
    timeout_s: float = Field(5.0, gt=0, le=60)
    # Route prefixes where ext_authz is meant to be off; default: stepup.path_prefix + "/".
    exempt_prefixes: tuple[str, ...] | None = None


class MetricsSettings(BaseModel):
    """``/metrics`` on a listener of its own, so a scraper needs no access to the step-up
    port and the proxies none to the metrics. No port: ``/metrics`` on the HTTP port only."""

    model_config = _FROZEN
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=0, le=65535)


class LogSettings(BaseModel):
    model_config = _FROZEN
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(True, alias="json")


class TracingSettings(BaseModel):
    """OpenTelemetry traces over OTLP/HTTP (authz/ops/tracing.py); off by default."""

    model_config = _FROZEN
    enabled: bool = False
    # The collector's OTLP/HTTP traces URL (an OpenTelemetry Collector listens on 4318).
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    service_name: str = "stepup-authz"
    # Traces that start here (no traceparent); a request from Envoy follows Envoy's choice.
    sample_ratio: float = Field(1.0, ge=0, le=1)
    timeout_s: float = Field(5.0, gt=0)
    export_interval_s: float = Field(2.0, gt=0)
    max_queue_size: int = Field(4096, ge=16)

    @field_validator("endpoint")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (OTLP/HTTP)")
        return v


class Settings(BaseModel):
    model_config = _FROZEN
    policy_file: Path
    policy_poll_s: float = Field(2.0, gt=0)
    grpc: GrpcSettings = GrpcSettings()
    http: HttpSettings = HttpSettings()
    http_authz: HttpAuthzSettings = HttpAuthzSettings()
    redis: RedisSettings = RedisSettings()
    oidc: OidcSettings
    stepup: StepupSettings = StepupSettings()
    network: NetworkSettings = NetworkSettings()
    devices: DeviceSettings = DeviceSettings()
    state: StateSettings = StateSettings()
    api: ApiSettings = ApiSettings()
    crypto: CryptoSettings = CryptoSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
    audit: AuditSettings = AuditSettings()
    coverage: CoverageSettings = CoverageSettings()
    passkeys: PasskeySettings = PasskeySettings()
    ciba: CibaSettings = CibaSettings()
    tracing: TracingSettings = TracingSettings()
    logout: LogoutSettings = LogoutSettings()


_ENV_MAP: dict[str, tuple[str, ...]] = {
    "REDIS_URL": ("redis", "url"),
    "STEPUP_GRPC_PORT": ("grpc", "port"),
    "STEPUP_HTTP_PORT": ("http", "port"),
    "STEPUP_GRPC_HOST": ("grpc", "host"),
    "STEPUP_HTTP_HOST": ("http", "host"),
    "STEPUP_HTTP_AUTHZ_PORT": ("http_authz", "port"),
    "STEPUP_METRICS_HOST": ("metrics", "host"),
    "STEPUP_METRICS_PORT": ("metrics", "port"),
    "STEPUP_POLICY_FILE": ("policy_file",),
    "STEPUP_OIDC_ISSUER": ("oidc", "issuer"),
    "STEPUP_OIDC_CLIENT_SECRET": ("oidc", "client_secret"),
    "STEPUP_PUBLIC_URL": ("stepup", "public_url"),
    "STEPUP_LOG_LEVEL": ("log", "level"),
    "STEPUP_AUDIT_REDIS_URL": ("audit", "redis_url"),
    "STEPUP_TRACING_ENDPOINT": ("tracing", "endpoint"),
    # `serve --workers` hands its workers one step-up link key when none is configured.
    "STEPUP_CONTEXT_KEY_FILE": ("stepup", "context_key_file"),
}


def _apply_env(doc: dict[str, Any], env: dict[str, str]) -> dict[tuple[str, ...], str]:
    """Apply the overrides; returns which field each variable set (for error messages)."""
    applied: dict[tuple[str, ...], str] = {}
    for var, path in _ENV_MAP.items():
        if var in env and env[var] != "":
            node = doc
            for part in path[:-1]:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise ConfigError(
                        f"${var} sets {'.'.join(path)}, but {part} is not a mapping in the file"
                    )
                node = child
            node[path[-1]] = env[var]
            applied[path] = var
    return applied


def load_settings(path: Path | str, env: dict[str, str] | None = None) -> Settings:
    """Load and validate the settings file; relative paths resolve against its folder.

    Every problem is reported at once (``ConfigErrors``), each with the file, line, column
    and field; an unknown key is named with the closest known one ("did you mean")."""
    path = Path(path)
    parsed = read_mapping(path, "settings document")
    doc = parsed.doc
    try:
        from_env = _apply_env(doc, dict(os.environ) if env is None else env)
    except ConfigError as exc:
        raise ConfigError(exc.reason, source=str(path)) from None
    try:
        settings = Settings.model_validate(doc)
    except ValidationError as exc:
        raise report(exc, Settings, parsed, source=str(path), from_env=from_env) from None
    return _resolve_paths(settings, path.parent)


def _resolve_paths(s: Settings, base: Path) -> Settings:
    def fix(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else base / p

    updates: dict[str, Any] = {}
    if (p := fix(s.policy_file)) is not None:
        updates["policy_file"] = p
    oidc: dict[str, Any] = {}
    for name in ("jwks_file", "client_secret_file"):
        if (p := fix(getattr(s.oidc, name))) is not None:
            oidc[name] = p
    intro = s.oidc.introspection
    if intro is not None and (p := fix(intro.client_secret_file)) is not None:
        oidc["introspection"] = intro.model_copy(update={"client_secret_file": p})
    if oidc:
        updates["oidc"] = s.oidc.model_copy(update=oidc)
    if (p := fix(s.network.geoip_database)) is not None:
        updates["network"] = s.network.model_copy(update={"geoip_database": p})
    if (p := fix(s.stepup.context_key_file)) is not None:
        updates["stepup"] = s.stepup.model_copy(update={"context_key_file": p})
    if s.api.callers or s.api.tls is not None:
        updates["api"] = _resolve_api(s.api, fix)
    devices: dict[str, Any] = {}
    assertion = s.devices.assertion
    if assertion is not None and (p := fix(assertion.jwks_file)) is not None:
        devices["assertion"] = assertion.model_copy(update={"jwks_file": p})
    if (p := fix(s.devices.certificate_ca_file)) is not None:
        devices["certificate_ca_file"] = p
    if devices:
        updates["devices"] = s.devices.model_copy(update=devices)
    mds = s.passkeys.mds
    mds_paths = {n: q for n in ("blob_file", "root_cert_file") if (q := fix(getattr(mds, n)))}
    if mds_paths:
        updates["passkeys"] = s.passkeys.model_copy(
            update={"mds": mds.model_copy(update=mds_paths)}
        )
    if s.crypto.keys:
        keys = {kid: fix(p) or p for kid, p in s.crypto.keys.items()}
        updates["crypto"] = s.crypto.model_copy(update={"keys": keys})
    audit: dict[str, Any] = {
        n: q for n in ("password_file", "ca_file") if (q := fix(getattr(s.audit, n)))
    }
    if any(not q.is_absolute() for q in s.audit.mac_keys.values()):
        audit["mac_keys"] = {kid: fix(q) or q for kid, q in s.audit.mac_keys.items()}
    if audit:
        updates["audit"] = s.audit.model_copy(update=audit)
    for name in ("http", "http_authz"):
        listener = getattr(s, name)
        if listener.tls is not None:
            files = {
                n: q
                for n in ("cert_file", "key_file", "client_ca_file")
                if (q := fix(getattr(listener.tls, n))) is not None
            }
            updates[name] = listener.model_copy(
                update={"tls": listener.tls.model_copy(update=files)}
            )
    if s.grpc.tls is not None:
        tls = {
            n: q
            for n in ("cert_file", "key_file", "client_ca_file")
            if (q := fix(getattr(s.grpc.tls, n))) is not None
        }
        updates["grpc"] = s.grpc.model_copy(update={"tls": s.grpc.tls.model_copy(update=tls)})
    return s.model_copy(update=updates) if updates else s


def _resolve_api(api: ApiSettings, fix: Callable[[Path | None], Path | None]) -> ApiSettings:
    def keep(p: Path | None) -> Path | None:
        return fix(p) or p

    callers = []
    for c in api.callers:
        update: dict[str, Any] = {"bearer_secret_file": keep(c.bearer_secret_file)}
        if c.proof is not None:
            update["proof"] = c.proof.model_copy(update={"jwks_file": keep(c.proof.jwks_file)})
        callers.append(c.model_copy(update=update))
    update_api: dict[str, Any] = {"callers": tuple(callers)}
    if api.tls is not None:
        update_api["tls"] = api.tls.model_copy(
            update={
                n: keep(getattr(api.tls, n)) for n in ("cert_file", "key_file", "client_ca_file")
            }
        )
    return api.model_copy(update=update_api)
