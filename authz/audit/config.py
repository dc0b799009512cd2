"""Settings for the audit trail: the service side (``AuditSettings``, the ``audit:`` block
of the service settings) and the exporter process (``ExporterSettings``, its own file).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

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

    @field_validator("redis_url")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v


class ExporterSettings(BaseModel):
    """The exporter process: stream -> signed, hash-chained JSON Lines segments."""

    model_config = _FROZEN
    redis_url: str = "redis://127.0.0.1:6379"
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


def load_exporter_settings(path: Path) -> ExporterSettings:
    """Load the exporter's YAML file; relative paths resolve against its folder."""
    s = validated(read_mapping(path, "exporter settings"), ExporterSettings)
    base = path.parent
    fixes = {
        n: base / p
        for n in ("archive_dir", "signing_key_file", "password_file", "ca_file")
        if (p := getattr(s, n)) is not None and not p.is_absolute()
    }
    return s.model_copy(update=fixes) if fixes else s
