"""Settings for the audit trail: the service side (``AuditSettings``, the ``audit:`` block
of the service settings) and the exporter process (``ExporterSettings``, its own file).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from authz.config.yamlfile import read_mapping, validated

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class AuditSettings(BaseModel):
    """The service's audit configuration (``audit:`` in the service settings file)."""

    model_config = _FROZEN
    enabled: bool = True
    # The stream lives in the session Redis unless a URL is given (a separate, AOF
    # `appendfsync always` instance is the stronger choice; see the README).
    redis_url: str | None = None
    stream_key: str = "stepup:audit"
    # Allows at or above this level are returned only after the record is durably accepted.
    # None: no audit-before-access (allows are not audited).
    durable_level: str | None = "elevated"
    durable_deadline_ms: int = Field(100, ge=1, le=10_000)
    # After XADD, WAIT for this many replicas (0: rely on the primary's AOF fsync policy).
    wait_replicas: int = Field(0, ge=0, le=16)
    wait_timeout_ms: int = Field(50, ge=1, le=10_000)
    # Non-critical events: bounded buffer, drained in batches by a background task.
    buffer_size: int = Field(10_000, ge=1)
    batch_size: int = Field(256, ge=1, le=10_000)
    stdout: bool = False  # also write JSON lines to stdout for log collectors
    # The MAC key ring (authz/audit/mac.py): kid -> file of 32 random bytes, raw or base64
    # (a Secret mount shared with the exporter; never in Redis). Required when enabled: the
    # service refuses to start without it. New records are MAC'd under mac_active_kid.
    mac_keys: dict[str, Path] = {}
    mac_active_kid: str | None = None
    # The audit Redis's own credentials (audit.redis_url): the ACL user that may only XADD
    # to the stream, and its password file. Unset: the session Redis's (redis.*).
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    # An idle producer writes audit.producer_heartbeat this often, so a deleted newest
    # record shows as a gap within this interval (the exporter's producer_silent_s > it).
    heartbeat_s: float = Field(60.0, gt=0, le=86_400)

    @field_validator("redis_url")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("stream_key")
    @classmethod
    def _stream_key(cls, v: str) -> str:
        if not v or not v.isascii() or "\n" in v:
            raise ValueError("must be ASCII without a newline (it is part of every MAC)")
        return v

    @model_validator(mode="after")
    def _ring(self) -> AuditSettings:
        _check_ring(self.mac_keys, self.mac_active_kid, "audit.mac")
        return self


_KID = re.compile(r"[A-Za-z0-9_-]{1,32}")


def _check_ring(
    keys: dict[str, Path], active: str | None, what: str, *, producer: bool = True
) -> None:
    bad = [k for k in keys if not _KID.fullmatch(k)]
    if bad:
        raise ValueError(f"{what} key ids must match [A-Za-z0-9_-]{{1,32}}: {bad}")
    if active is not None and active not in keys:
        raise ValueError(f"{what}_active_kid {active!r} is not in {what}_keys")
    if producer and len(keys) > 1 and active is None:
        raise ValueError(f"several {what}_keys: set {what}_active_kid")


class ExporterSettings(BaseModel):
    """The exporter process: stream -> signed, hash-chained JSON Lines segments."""

    model_config = _FROZEN
    redis_url: str = "redis://127.0.0.1:6379"
    # The ACL user that may read and trim the stream (docs/audit.md "Deployment").
    username: str | None = None
    # As the service's redis.password_file / redis.ca_file: the password read from a file (a
    # mounted Secret; not also in redis_url), and the CA that verifies a rediss:// server.
    password_file: Path | None = None
    ca_file: Path | None = None
    stream_key: str = "stepup:audit"
    archive_dir: Path
    signing_key_file: Path
    segment_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    segment_max_age_s: float = Field(3600.0, gt=0)
    checkpoint_every: int = Field(1000, ge=1)  # records
    checkpoint_interval_s: float = Field(60.0, gt=0)
    batch_size: int = Field(500, ge=1, le=100_000)
    block_ms: int = Field(1000, ge=1, le=60_000)
    # After a batch that was not full, wait this long before reading again, so one fsync,
    # one XREAD and one XTRIM cover many records (each costs far more than a record's own
    # chaining). Bounds the extra archive lag; 0 reads again at once.
    linger_ms: int = Field(100, ge=0, le=10_000)
    # Trim the stream (XTRIM MINID ~) up to what is archived and fsync'ed; never further.
    trim: bool = True
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # The producers' MAC keys (the service's audit.mac_keys): every key a running producer
    # may still use. An entry that does not verify is quarantined, never archived as genuine.
    mac_keys: dict[str, Path]
    # A missing sequence number is reported as a gap once a later one has waited this long
    # (records of one producer can arrive out of order: several connections, retries).
    reorder_window_s: float = Field(10.0, gt=0, le=3600)
    # A producer that wrote nothing (not even a heartbeat) this long and never stopped is
    # reported (audit.producer_silent); forgotten after producer_forget_s.
    producer_silent_s: float = Field(300.0, gt=0)
    producer_forget_s: float = Field(7 * 86_400.0, gt=0)
    # The latest signed checkpoint (the head) is also written here: a file on another
    # volume than the archive (and always to the stream <stream_key>:head and the log).
    head_file: Path | None = None

    @model_validator(mode="after")
    def _ring(self) -> ExporterSettings:
        if not self.mac_keys:
            raise ValueError("mac_keys is required: the producers' MAC keys")
        _check_ring(self.mac_keys, None, "mac", producer=False)  # it verifies only
        if self.producer_forget_s < self.producer_silent_s:
            raise ValueError("producer_forget_s must be at least producer_silent_s")
        return self


def load_exporter_settings(path: Path) -> ExporterSettings:
    """Load the exporter's YAML file; relative paths resolve against its folder."""
    s = validated(read_mapping(path, "exporter settings"), ExporterSettings)
    base = path.parent
    fixes = {
        n: base / p
        for n in ("archive_dir", "signing_key_file", "password_file", "ca_file", "head_file")
        if (p := getattr(s, n)) is not None and not p.is_absolute()
    }
    if any(not p.is_absolute() for p in s.mac_keys.values()):
        fixes["mac_keys"] = {k: p if p.is_absolute() else base / p for k, p in s.mac_keys.items()}
    return s.model_copy(update=fixes) if fixes else s
