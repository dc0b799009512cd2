"""In-memory fakes behind the same interfaces as the real adapters.

For unit tests and ``policy explain``: no Redis, no network. They keep the real adapters'
semantics that callers rely on (TTL expiry, one-time state, refusal of expired grants, a
fresh copy of every payload) and can be switched to fail like a dead store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from authz.core.session import EMPTY_SESSION, Grant, SessionSnapshot
from authz.errors import StoreError


class MemorySessionStore:
    """``RedisSessionStore`` in dicts, with an injectable clock.

    Entries expire on ``now()`` the way Redis expires keys on its own clock. Set ``fail``
    to make every call raise ``StoreError`` (``ping`` returns False), to exercise the
    fail-closed paths.
    """

    def __init__(self, now: Callable[[], float] = time.time, *, fail: bool = False) -> None:
        self.now = now
        self.fail = fail
        self.closed = False
        self.calls = 0  # store round trips made, for "one round trip per Check" assertions
        self._grants: dict[tuple[str, str], tuple[Grant, float]] = {}
        self._states: dict[str, tuple[str, float]] = {}

    def _enter(self) -> float:
        self.calls += 1
        if self.fail:
            raise StoreError("session store unavailable (MemorySessionStore.fail)")
        return self.now()

    async def read(self, session_key: str, levels: Sequence[str]) -> SessionSnapshot:
        t = self._enter()
        grants = []
        for level in levels:
            entry = self._grants.get((session_key, level))
            if entry is not None and entry[1] > t:
                grants.append(entry[0])
        return SessionSnapshot(grants=tuple(grants)) if grants else EMPTY_SESSION

    async def write_grant(self, session_key: str, grant: Grant, now: int) -> None:
        ttl = grant.expires_at - now
        if ttl < 1:
            raise ValueError("refusing to store a grant that has already expired")
        t = self._enter()
        self._grants[(session_key, grant.level)] = (grant, t + ttl)

    async def revoke_session(self, session_key: str, levels: Sequence[str]) -> int:
        t = self._enter()
        deleted = 0
        for level in levels:
            entry = self._grants.pop((session_key, level), None)
            if entry is not None and entry[1] > t:
                deleted += 1
        return deleted

    async def put_state(self, state_id: str, payload: Mapping[str, Any], ttl_s: int) -> None:
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        value = json.dumps(dict(payload))  # same serialisability rules as Redis
        t = self._enter()
        entry = self._states.get(state_id)
        if entry is not None and entry[1] > t:
            raise StoreError("step-up state id already in use")
        self._states[state_id] = (value, t + ttl_s)

    async def take_state(self, state_id: str) -> dict[str, Any] | None:
        t = self._enter()
        entry = self._states.pop(state_id, None)
        if entry is None or entry[1] <= t:
            return None
        doc: dict[str, Any] = json.loads(entry[0])
        return doc

    async def ping(self) -> bool:
        return not self.fail

    async def aclose(self) -> None:
        self.closed = True
