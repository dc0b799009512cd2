"""Authorizer + Auditor (needs the wiring patch): audit before access, fail closed."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from authz.audit.mac import Producer
from authz.audit.metrics import AuditMetrics
from authz.audit.sinks import Auditor, RedisStreamSink
from authz.audit.testing import make_ring
from authz.check.authorizer import Authorizer
from authz.config.policy_file import PolicyHolder
from authz.core.attributes import RequestAttributes
from authz.core.decision import Outcome
from authz.core.session import Evidence, Identity
from authz.ops.metrics import Metrics
from authz.store.connections import EmbeddedValkey
from authz.store.memory import MemorySessionStore

pytestmark = pytest.mark.integration

POLICY = """
levels:
  standard: {}
  elevated: {acr: [mfa], max_age: 900}
routes:
  - {path_prefix: /accounts/, level: elevated}
default_level: standard
"""


class Tokens:
    async def verify_access_token(self, token: str, now: int) -> Identity:
        return Identity("https://idp", "alice", "s1", Evidence("mfa", ("otp",), now - 5), now + 600)


def req(path: str) -> RequestAttributes:
    return RequestAttributes(
        "GET", "https", "h", path, "", MappingProxyType({"authorization": "Bearer abc"}), None
    )


async def test_allow_needs_a_durable_record(
    tmp_path: Path, embedded_valkey: EmbeddedValkey
) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    client = aioredis.Redis.from_url(embedded_valkey.url)
    auditor = Auditor(
        RedisStreamSink(client, stream_key="audit", deadline_ms=100),
        producer=Producer(make_ring(), "audit"),
        metrics=AuditMetrics(CollectorRegistry()),
    )
    auditor.start()
    authz = Authorizer(
        policy=PolicyHolder(tmp_path / "p.yaml"),
        tokens=Tokens(),
        store=MemorySessionStore(),
        metrics=Metrics(),
        token_cookie="t",
        leeway=0,
        auditor=auditor,
        audit_level="elevated",
    )
    result = await authz.check(req("/accounts/1"))
    d, did = result.decision, result.decision_id
    assert d.outcome is Outcome.ALLOW
    (_, hello), (_, fields) = await client.xrange("audit")
    assert json.loads(hello[b"r"])["type"] == "audit.producer_started"
    rec = json.loads(fields[b"r"])
    assert (rec["type"], rec["decision_id"], rec["acr"]) == ("access.allowed", did, "mfa")
    # Paused (CLIENT PAUSE, ended by Redis's own timer): the allow is refused by the
    # durable write's 100 ms deadline; waiting the pause out, the write would succeed.
    admin = aioredis.Redis.from_url(embedded_valkey.url)
    await admin.client_pause(2000, all=True)
    await admin.aclose()
    d = (await authz.check(req("/accounts/1"))).decision
    assert d.outcome is Outcome.ERROR and d.reason == "audit-unavailable"
    embedded_valkey.stop()
    d = (await authz.check(req("/accounts/1"))).decision
    assert d.outcome is Outcome.ERROR and d.reason == "audit-unavailable"
    d = (await authz.check(req("/public"))).decision  # below the audit level: not blocked
    assert d.outcome is Outcome.ALLOW
    await auditor.aclose(drain_timeout_s=0.2)
    await client.aclose()
