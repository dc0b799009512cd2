"""Shared fixtures: a real Redis for integration tests, per-test key prefixes, and a private
embedded Valkey that a test may stop and restart.

Redis, in order: ``REDIS_URL`` when it answers PING, else 127.0.0.1:6379 when it answers,
else an embedded Valkey started for the session. The choice is shown in the report header.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from functools import cache
from urllib.parse import urlsplit

import pytest
import redis

from authz.store.connections import EmbeddedValkey

_LOCAL_REDIS = "redis://127.0.0.1:6379"


def _reachable(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    except ValueError:
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=f"***@{parts.hostname}:{parts.port}").geturl()


@cache
def _external_redis() -> tuple[str | None, str]:
    """(url or None for embedded, description for the report header); probed once."""
    env = os.environ.get("REDIS_URL")
    notes = []
    if env:
        if _reachable(env):
            return env, f"REDIS_URL {_redacted(env)}"
        notes.append(f"REDIS_URL {_redacted(env)} unreachable")
    if _reachable(_LOCAL_REDIS):
        return _LOCAL_REDIS, "; ".join([*notes, f"local {_LOCAL_REDIS}"])
    return None, "; ".join([*notes, "embedded Valkey (started on first use)"])


def pytest_report_header(config: pytest.Config) -> str:
    return f"redis: {_external_redis()[1]}"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url, _ = _external_redis()
    if url is not None:
        yield url
        return
    server = EmbeddedValkey()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix unique to this test; its keys are deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def embedded_valkey() -> Iterator[EmbeddedValkey]:
    """A private, running Valkey; the test may ``stop()`` and ``start()`` it (same port)."""
    server = EmbeddedValkey()
    server.start()
    try:
        yield server
    finally:
        server.stop()
