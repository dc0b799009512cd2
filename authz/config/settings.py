"""Service configuration: one YAML file plus ``STEPUP_*`` / ``REDIS_URL`` environment
overrides, validated once into frozen objects.

Secrets are never inlined in the file in production: every secret field has a ``*_file``
twin (Kubernetes Secret mounts) and an environment variable.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from authz.audit.config import AuditSettings
from authz.config.yamlfile import load_yaml
from authz.errors import ConfigError

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


class HttpSettings(BaseModel):
    model_config = _FROZEN
    host: str = "127.0.0.1"
    port: int = Field(9192, ge=0, le=65535)


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
    token_typ: str | None = None  # e.g. "at+jwt" (RFC 9068); None => not checked
    token_cookie: str = "stepup_token"  # noqa: S105 - a cookie name, not a secret
    # When a token has no `sid`, use this claim as the session id (e.g. "jti" is wrong:
    # it changes per token). "sub" means one session per user.
    sid_fallback_claim: str | None = "sub"
    token_cache_size: int = Field(10_000, ge=0)
    http_timeout_s: float = Field(5.0, gt=0)

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

    @field_validator("public_url")
    @classmethod
    def _no_slash(cls, v: str) -> str:
        return v.rstrip("/")


class DeviceAssertionSettings(BaseModel):
    """A signed device assertion (JWT) from an MDM / device-trust service."""

    model_config = _FROZEN
    header: str = "x-device-assertion"
    issuer: str
    audience: str = "stepup-authz"
    algorithms: tuple[str, ...] = ("ES256", "RS256")
    jwks_url: str | None = None
    jwks_file: Path | None = None

    @model_validator(mode="after")
    def _keys(self) -> DeviceAssertionSettings:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("give one of jwks_url or jwks_file")
        return self


class DeviceSettings(BaseModel):
    model_config = _FROZEN
    # The random device id set after a completed step-up; None disables device cookies.
    cookie: str | None = "stepup_device"
    assertion: DeviceAssertionSettings | None = None


class StateSettings(BaseModel):
    """Retention of the per-user state in Redis (see the README's Redis footprint)."""

    model_config = _FROZEN
    session_ttl_s: int = Field(86_400, ge=60)  # >= the longest access-token lifetime
    history_ttl_s: int = Field(90 * 86_400, ge=3600)  # known devices / IPs, levels seen
    max_sessions: int = Field(50, ge=1, le=1000)
    max_devices: int = Field(20, ge=1, le=1000)
    max_ips: int = Field(50, ge=1, le=1000)


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


class ApiSettings(BaseModel):
    """The Sessions API (RecordGrant, RevokeSession, RevokeUser, ListSessions) on the gRPC
    port. Callers authenticate by mTLS (peer CN/SAN in allowed_peers) or a bearer secret."""

    model_config = _FROZEN
    enabled: bool = False
    allowed_peers: tuple[str, ...] = ()  # exact CN or SAN (DNS/URI/IP), e.g. spiffe://...
    bearer_secret_file: Path | None = None


class NetworkSettings(BaseModel):
    model_config = _FROZEN
    # Proxies in front of Envoy that append to X-Forwarded-For (a cloud load balancer: 1).
    # Must equal Envoy's xff_num_trusted_hops. 0: the client is Envoy's peer; XFF unread.
    trusted_xff_hops: int = Field(0, ge=0, le=10)
    # A MaxMind DB (GeoIP2/GeoLite2 City or Country) for country rules and travel.
    geoip_database: Path | None = None


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
    # `serve --workers` hands its workers one step-up link key when none is configured.
    "STEPUP_CONTEXT_KEY_FILE": ("stepup", "context_key_file"),
}


def _apply_env(doc: dict[str, Any], env: dict[str, str]) -> None:
    for var, path in _ENV_MAP.items():
        if var in env and env[var] != "":
            node = doc
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = env[var]


def load_settings(path: Path | str, env: dict[str, str] | None = None) -> Settings:
    """Load and validate the settings file; relative paths resolve against its folder."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(path)) from exc
    parsed = load_yaml(raw, str(path))
    doc = parsed.doc or {}
    if not isinstance(doc, dict):
        raise ConfigError("the settings document must be a mapping", source=str(path))
    _apply_env(doc, dict(os.environ) if env is None else env)
    try:
        settings = Settings.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise parsed.error(first["msg"], loc) from exc
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
    if oidc:
        updates["oidc"] = s.oidc.model_copy(update=oidc)
    if (p := fix(s.network.geoip_database)) is not None:
        updates["network"] = s.network.model_copy(update={"geoip_database": p})
    if (p := fix(s.stepup.context_key_file)) is not None:
        updates["stepup"] = s.stepup.model_copy(update={"context_key_file": p})
    if (p := fix(s.api.bearer_secret_file)) is not None:
        updates["api"] = s.api.model_copy(update={"bearer_secret_file": p})
    assertion = s.devices.assertion
    if assertion is not None and (p := fix(assertion.jwks_file)) is not None:
        updates["devices"] = s.devices.model_copy(
            update={"assertion": assertion.model_copy(update={"jwks_file": p})}
        )
    if s.crypto.keys:
        keys = {kid: fix(p) or p for kid, p in s.crypto.keys.items()}
        updates["crypto"] = s.crypto.model_copy(update={"keys": keys})
    if s.grpc.tls is not None:
        tls = {
            n: q
            for n in ("cert_file", "key_file", "client_ca_file")
            if (q := fix(getattr(s.grpc.tls, n))) is not None
        }
        updates["grpc"] = s.grpc.model_copy(update={"tls": s.grpc.tls.model_copy(update=tls)})
    return s.model_copy(update=updates) if updates else s
