"""The service's side of the trail, built from its settings: the Auditor, its producer
(MAC key ring, sequence) and the audit Redis connection (``audit.redis_url`` with its own
ACL user, else the session Redis).

``start_service`` (authz/app.py) calls ``build_auditor`` once per process; each process
(each ``serve --workers`` worker) is a producer of its own.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from authz.audit.mac import MacKeyRing, Producer
from authz.audit.metrics import AuditMetrics
from authz.audit.sinks import Auditor, MirrorSink, RedisStreamSink, StdoutSink
from authz.config.settings import RedisSettings, Settings
from authz.errors import ConfigError
from authz.store.connections import make_client
from authz.store.fastredis import make_fast_redis


def with_username(url: str, username: str | None) -> str:
    """``url`` with its user part set to ``username`` (an ACL user; the password comes
    from a file). A URL that names another user already is refused: one source of truth."""
    if username is None:
        return url
    parts = urlsplit(url)
    if parts.username and parts.username != username:
        raise ConfigError(
            f"the URL names user {parts.username!r} but username is {username!r}",
            location="audit.username",
        )
    host = parts.netloc.rpartition("@")[2]
    userinfo = quote(username, safe="")
    if parts.password:
        userinfo += ":" + quote(parts.password, safe="")
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def mac_ring(settings: Settings) -> MacKeyRing:
    """The MAC key ring; the service refuses to start with auditing on and no key."""
    audit = settings.audit
    if not audit.mac_keys:
        raise ConfigError(
            "auditing is enabled but no MAC key is configured: set audit.mac_keys "
            "(kid -> key file, `stepup-authz audit keygen --mac`) and audit.mac_active_kid, "
            "the same files the exporter's mac_keys name; or audit.enabled: false",
            location="audit.mac_keys",
        )
    return MacKeyRing.from_files(audit.mac_keys, audit.mac_active_kid, location="audit.mac_keys")


def audit_redis_settings(settings: Settings) -> RedisSettings:
    """The connection settings of the separate audit Redis: the session Redis's, with the
    audit block's own password and CA files where given."""
    audit = settings.audit
    update: dict[str, Any] = {}
    if audit.password_file is not None:
        update["password_file"] = audit.password_file
    if audit.ca_file is not None:
        update["ca_file"] = audit.ca_file
    return settings.redis.model_copy(update=update) if update else settings.redis


def build_auditor(
    settings: Settings, client: Any, fast: Any, metrics: AuditMetrics, closers: list[object]
) -> Auditor | None:
    """The started Auditor (None when auditing is off). What it opens is appended to
    ``closers`` in the order it must be closed in reverse (the Auditor, drained, before its
    Redis clients)."""
    audit = settings.audit
    if not audit.enabled:
        return None
    ring = mac_ring(settings)
    audit_client, audit_fast = client, fast
    if audit.redis_url is not None:
        url = with_username(audit.redis_url, audit.username)
        conn = audit_redis_settings(settings)
        audit_client = make_client(url, conn)
        closers.append(audit_client)
        # A separate audit Redis gets a hot-path transport of its own, too.
        audit_fast = make_fast_redis(conn, url)
        if audit_fast is not None:
            closers.append(audit_fast)
    elif audit.username is not None or audit.password_file is not None:
        raise ConfigError(
            "audit.username / audit.password_file are for a separate audit Redis: "
            "set audit.redis_url",
            location="audit",
        )
    mirrors: list[MirrorSink] = [StdoutSink()] if audit.stdout else []
    auditor = Auditor(
        RedisStreamSink(
            audit_client,
            stream_key=audit.stream_key,
            deadline_ms=audit.durable_deadline_ms,
            wait_replicas=audit.wait_replicas,
            wait_timeout_ms=audit.wait_timeout_ms,
            fast=audit_fast,
        ),
        producer=Producer(ring, audit.stream_key),
        metrics=metrics,
        buffer_size=audit.buffer_size,
        batch_size=audit.batch_size,
        mirrors=mirrors,
        heartbeat_s=audit.heartbeat_s,
    )
    auditor.start()
    closers.append(auditor)  # closed (drained) before the Redis clients
    return auditor
