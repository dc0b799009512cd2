"""The push step-up's Redis state against a real Redis (or the embedded Valkey): sealed
records that do not open under another request's key, one poller per lease, one outcome
per marker, fixed-window counters, one pending request per session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from authz.errors import StoreError
from authz.store.ciba import RedisCibaStore, _h
from authz.store.crypto import FieldCipher

pytestmark = pytest.mark.integration

A = "A" * 32
B = "B" * 32


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture
def store(client: aioredis.Redis, redis_prefix: str) -> RedisCibaStore:
    return RedisCibaStore(
        client, prefix=redis_prefix, deadline_ms=2000, cipher=FieldCipher.generate()
    )


async def test_a_record_is_sealed_and_read_back(
    store: RedisCibaStore, client: aioredis.Redis, redis_prefix: str
) -> None:
    await store.create(A, {"auth_req_id": "secret-id", "sk": "s1"}, 60)
    assert await store.load(A) == {"auth_req_id": "secret-id", "sk": "s1"}
    raw = await client.get(f"{redis_prefix}ciba:req:{_h(A)}")
    assert raw is not None and b"secret-id" not in raw  # nothing in clear
    assert await client.exists(f"{redis_prefix}ciba:req:{A}") == 0  # the raw id names no key
    with pytest.raises(StoreError):
        await store.create(A, {"x": 1}, 60)  # an id is used once


async def test_a_record_moved_to_another_requests_key_does_not_open(
    store: RedisCibaStore, client: aioredis.Redis, redis_prefix: str
) -> None:
    """Swapping auth_req_ids with Redis write access: B's sealed record copied over A's."""
    await store.create(A, {"auth_req_id": "alice-request", "sk": "alice"}, 60)
    await store.create(B, {"auth_req_id": "mallory-request", "sk": "mallory"}, 60)
    b_raw = await client.get(f"{redis_prefix}ciba:req:{_h(B)}")
    await client.set(f"{redis_prefix}ciba:req:{_h(A)}", b_raw)
    assert await store.load(A) is None
    assert (await store.load(B) or {})["sk"] == "mallory"


async def test_save_keeps_an_expired_record_gone(store: RedisCibaStore) -> None:
    await store.save(A, {"status": "approved"}, 60)  # never created: stays absent
    assert await store.load(A) is None
    await store.create(A, {"status": "pending"}, 60)
    await store.save(A, {"status": "approved"}, 60)
    assert await store.load(A) == {"status": "approved"}


async def test_one_poller_holds_the_lease(store: RedisCibaStore) -> None:
    assert await store.lease(A, "replica-1", 10_000)
    assert not await store.lease(A, "replica-2", 10_000)
    await store.release(A, "replica-2")  # not its lease: left alone
    assert not await store.lease(A, "replica-2", 10_000)
    await store.release(A, "replica-1")
    assert await store.lease(A, "replica-2", 10_000)


async def test_markers_and_counters(store: RedisCibaStore) -> None:
    assert await store.once("end:A", 60)
    assert not await store.once("end:A", 60)
    counts = [await store.hit("s:sk", 600) for _ in range(3)]
    assert [c for c, _ in counts] == [1, 2, 3]
    assert all(0 < left <= 600 for _, left in counts)


async def test_one_pending_request_per_session(store: RedisCibaStore) -> None:
    assert await store.claim_slot("sk", A, 60) == 0
    held = await store.claim_slot("sk", B, 60)
    assert 0 < held <= 60
    await store.release_slot("sk", B)  # B never held it
    assert await store.claim_slot("sk", B, 60) > 0
    await store.release_slot("sk", A)
    assert await store.claim_slot("sk", B, 60) == 0


async def test_an_unreachable_redis_is_a_store_error() -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=9, socket_connect_timeout=0.2)
    store = RedisCibaStore(dead, prefix="x:", deadline_ms=500, cipher=FieldCipher.generate())
    with pytest.raises(StoreError):
        await store.load(A)
    with pytest.raises(StoreError):
        await store.hit("s:sk", 60)
    await dead.aclose()
