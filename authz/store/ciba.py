"""The state of push step-ups (OpenID CIBA, ``authz.stepup.ciba``) in Redis, and its fake.

Per request, under a hash of the request id the API client holds (the raw id never names a
key): the record (sealed like every step-up state: AES-GCM with the key as associated data,
so a value copied under another request's key does not open), a poll lease (one poller at
a time across replicas, so the IdP is never polled faster than its ``interval``) and
remember-once markers (one outcome per request, one grant per ``auth_req_id``). Per
session: the one pending request's slot; per session and per user: fixed-window counters
of starts (push bombing).

Every call is bounded by the deadline; any error is a ``StoreError`` (the caller fails
closed).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from authz.errors import StoreError
from authz.store.crypto import FieldCipher

_CLIENT_ERRORS = (RedisError, RedisClusterException, OSError, AttributeError)

# Delete KEYS[1] only while it holds ARGV[1] (a lease or a slot another holder now owns is
# left alone).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# A fixed window: the first hit starts it. Reply: {count, seconds left in the window}.
_HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('TTL', KEYS[1])
if ttl < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return {n, ttl}
"""


def _h(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:40]


class CibaStore(Protocol):
    """What the CIBA flow keeps: ``RedisCibaStore``, and ``MemoryCibaStore`` in tests."""

    async def create(self, request_id: str, doc: Mapping[str, Any], ttl_s: int) -> None:
        """Store a new record (SET NX); an id already in use is a StoreError."""
        ...

    async def load(self, request_id: str) -> dict[str, Any] | None:
        """The record, or None (unknown, expired, or a value that does not open)."""
        ...

    async def save(self, request_id: str, doc: Mapping[str, Any], ttl_s: int) -> None:
        """Overwrite a live record (SET XX): one that expired meanwhile stays gone."""
        ...

    async def lease(self, request_id: str, holder: str, ttl_ms: int) -> bool:
        """True when ``holder`` now holds the request's poll lease (SET NX PX)."""
        ...

    async def release(self, request_id: str, holder: str) -> None: ...

    async def once(self, key: str, ttl_s: int) -> bool:
        """True the first time ``key`` is marked within ``ttl_s``."""
        ...

    async def hit(self, counter: str, window_s: int) -> tuple[int, int]:
        """Count one start against ``counter``: (starts in the window, seconds it has left)."""
        ...

    async def claim_slot(self, session: str, request_id: str, ttl_s: int) -> int:
        """Make ``request_id`` the session's one pending request: 0 when claimed, else the
        seconds until the request holding it expires."""
        ...

    async def release_slot(self, session: str, request_id: str) -> None: ...


class RedisCibaStore:
    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        deadline_ms: int,
        cipher: FieldCipher,
        on_corrupt: Callable[[], None] | None = None,
    ) -> None:
        if deadline_ms < 1:
            raise ValueError("deadline_ms must be >= 1")
        self._client = client
        self._prefix = f"{prefix}ciba:"
        self._deadline_s = deadline_ms / 1000
        self._cipher = cipher
        self._on_corrupt = on_corrupt

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}{kind}:{_h(name)}"

    async def _call(self, what: str, awaitable: Any) -> Any:
        try:
            async with asyncio.timeout(self._deadline_s):
                return await awaitable
        except _CLIENT_ERRORS as exc:
            raise StoreError(f"ciba {what} failed: {type(exc).__name__}") from exc

    def _seal(self, key: str, doc: Mapping[str, Any]) -> str:
        return self._cipher.encrypt(json.dumps(dict(doc), separators=(",", ":")), key)

    async def create(self, request_id: str, doc: Mapping[str, Any], ttl_s: int) -> None:
        key = self._key("req", request_id)
        stored = await self._call(
            "create", self._client.set(key, self._seal(key, doc), ex=max(1, ttl_s), nx=True)
        )
        if not stored:
            raise StoreError("ciba request id already in use")

    async def load(self, request_id: str) -> dict[str, Any] | None:
        key = self._key("req", request_id)
        raw = await self._call("load", self._client.get(key))
        if raw is None:
            return None
        plain = self._cipher.decrypt(raw, key)
        try:
            doc = None if plain is None else json.loads(plain)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict):
            if self._on_corrupt is not None:
                self._on_corrupt()
            return None
        return doc

    async def save(self, request_id: str, doc: Mapping[str, Any], ttl_s: int) -> None:
        key = self._key("req", request_id)
        await self._call(
            "save", self._client.set(key, self._seal(key, doc), ex=max(1, ttl_s), xx=True)
        )

    async def lease(self, request_id: str, holder: str, ttl_ms: int) -> bool:
        key = self._key("lease", request_id)
        return bool(
            await self._call("lease", self._client.set(key, holder, px=max(1, ttl_ms), nx=True))
        )

    async def release(self, request_id: str, holder: str) -> None:
        key = self._key("lease", request_id)
        await self._call("release", self._client.eval(_RELEASE, 1, key, holder))

    async def once(self, key: str, ttl_s: int) -> bool:
        name = f"{self._prefix}once:{_h(key)}"
        return bool(
            await self._call("once", self._client.set(name, b"1", ex=max(1, ttl_s), nx=True))
        )

    async def hit(self, counter: str, window_s: int) -> tuple[int, int]:
        key = self._key("rate", counter)
        reply = await self._call("rate", self._client.eval(_HIT, 1, key, str(window_s)))
        try:
            count, left = (int(v) for v in reply)
        except (TypeError, ValueError) as exc:
            raise StoreError("ciba rate: unexpected script reply") from exc
        return count, max(1, left)

    async def claim_slot(self, session: str, request_id: str, ttl_s: int) -> int:
        key = self._key("slot", session)
        if await self._call("slot", self._client.set(key, _h(request_id), ex=ttl_s, nx=True)):
            return 0
        left = await self._call("slot", self._client.ttl(key))
        return max(1, int(left))

    async def release_slot(self, session: str, request_id: str) -> None:
        key = self._key("slot", session)
        await self._call("slot", self._client.eval(_RELEASE, 1, key, _h(request_id)))


class MemoryCibaStore:
    """``CibaStore`` in dictionaries, on an injected clock (unit tests). ``fail`` makes
    every call a StoreError; ``records`` is what was stored, by request id."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.fail = False
        self.records: dict[str, tuple[str, float]] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._once: dict[str, float] = {}
        self._counters: dict[str, tuple[int, float]] = {}
        self._slots: dict[str, tuple[str, float]] = {}

    def _now(self) -> float:
        if self.fail:
            raise StoreError("memory store set to fail")
        return self.clock()

    async def create(self, request_id: str, doc: Mapping[str, Any], ttl_s: int) -> None:
        t = self._now()
        held = self.records.get(request_id)
        if held is not None and held[1] > t:
            raise StoreError("ciba request id already in use")
        self.records[request_id] = (json.dumps(dict(doc)), t + max(1, ttl_s))

    async def load(self, request_id: str) -> dict[str, Any] | None:
        t = self._now()
        held = self.records.get(request_id)
        if held is None or held[1] <= t:
            return None
        doc: dict[str, Any] = json.loads(held[0])
        return doc

    async def save(self, request_id: str, doc: Mapping[str, Any], ttl_s: int) -> None:
        t = self._now()
        held = self.records.get(request_id)
        if held is not None and held[1] > t:
            self.records[request_id] = (json.dumps(dict(doc)), t + max(1, ttl_s))

    async def lease(self, request_id: str, holder: str, ttl_ms: int) -> bool:
        t = self._now()
        held = self._leases.get(request_id)
        if held is not None and held[1] > t:
            return False
        self._leases[request_id] = (holder, t + max(1, ttl_ms) / 1000)
        return True

    async def release(self, request_id: str, holder: str) -> None:
        self._now()
        held = self._leases.get(request_id)
        if held is not None and held[0] == holder:
            del self._leases[request_id]

    async def once(self, key: str, ttl_s: int) -> bool:
        t = self._now()
        seen = self._once.get(key)
        if seen is not None and seen > t:
            return False
        self._once[key] = t + max(1, ttl_s)
        return True

    async def hit(self, counter: str, window_s: int) -> tuple[int, int]:
        t = self._now()
        count, ends = self._counters.get(counter, (0, 0.0))
        if ends <= t:
            count, ends = 0, t + window_s
        self._counters[counter] = (count + 1, ends)
        return count + 1, max(1, int(ends - t))

    async def claim_slot(self, session: str, request_id: str, ttl_s: int) -> int:
        t = self._now()
        held = self._slots.get(session)
        if held is not None and held[1] > t:
            return max(1, int(held[1] - t))
        self._slots[session] = (request_id, t + ttl_s)
        return 0

    async def release_slot(self, session: str, request_id: str) -> None:
        self._now()
        held = self._slots.get(session)
        if held is not None and held[0] == request_id:
            del self._slots[session]
