"""The Redis session store: step-up grants read once per Check, one-time step-up state.

Key layout (``prefix`` is ``RedisSettings.key_prefix``, e.g. ``stepup:``)::

    {prefix}g:{<session_key>}:<level>   a grant; string, compact JSON; TTL = grant expiry
    {prefix}st:<sha256(state_id)>       step-up state; string, JSON; TTL = state lifetime

- ``session_key`` is already a hash, H(iss, sub, sid) (``authz.core.session.session_key``).
  The braces are a Redis Cluster hash tag: all of one session's grant keys live in one
  slot, so the per-Check MGET stays a single round trip on Cluster too.
- The raw state id also travels in the browser's cookie and the OIDC ``state`` parameter,
  so it is never used as a key: whoever can list keys learns nothing they can replay.
- Grant value: ``{"v":1,"level","acr","amr":[...],"auth_time","exp","iat"}``. Nothing
  secret: no tokens, no codes, no PII beyond the hashed session key.

Every failure (a Redis error, an ``OSError``, a missed deadline) raises ``StoreError``; a
read never turns a failure into an empty snapshot, because "no grant" and "could not look"
are both denies but only the second is counted and audited as a fail-closed event.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from authz.core.session import EMPTY_SESSION, Evidence, Grant, SessionSnapshot
from authz.errors import StoreError

GRANT_FORMAT_VERSION = 1


class SessionStore(Protocol):
    """What the service needs from a session store (Redis, or the in-memory fake)."""

    async def read(self, session_key: str, levels: Sequence[str]) -> SessionSnapshot: ...
    async def write_grant(self, session_key: str, grant: Grant, now: int) -> None: ...
    async def revoke_session(self, session_key: str, levels: Sequence[str]) -> int: ...
    async def put_state(self, state_id: str, payload: Mapping[str, Any], ttl_s: int) -> None: ...
    async def take_state(self, state_id: str) -> dict[str, Any] | None: ...
    async def ping(self) -> bool: ...
    async def aclose(self) -> None: ...


def encode_grant(grant: Grant) -> bytes:
    ev = grant.evidence
    doc = {
        "v": GRANT_FORMAT_VERSION,
        "level": grant.level,
        "acr": ev.acr,
        "amr": list(ev.amr),
        "auth_time": ev.auth_time,
        "exp": grant.expires_at,
        "iat": grant.issued_at,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def decode_grant(raw: bytes | str, level: str) -> Grant | None:
    """The grant in ``raw`` if it is well formed and for ``level``; else None (not evidence)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("v") != GRANT_FORMAT_VERSION:
        return None
    acr, amr, auth_time = doc.get("acr"), doc.get("amr"), doc.get("auth_time")
    exp, iat = doc.get("exp"), doc.get("iat")
    if (
        doc.get("level") != level  # a value copied to another level's key is not evidence
        or not (acr is None or isinstance(acr, str))
        or not (isinstance(amr, list) and all(isinstance(a, str) for a in amr))
        or not (auth_time is None or _int(auth_time))
        or not isinstance(exp, int)
        or not isinstance(iat, int)
        or not (_int(exp) and _int(iat))  # bool is an int subclass: refuse true/false
    ):
        return None
    return Grant(
        level=level,
        evidence=Evidence(acr=acr, amr=tuple(amr), auth_time=auth_time),
        expires_at=exp,
        issued_at=iat,
    )


def state_key(prefix: str, state_id: str) -> str:
    return f"{prefix}st:{hashlib.sha256(state_id.encode()).hexdigest()}"


class RedisSessionStore:
    """Grants and step-up state in Redis/Valkey. Every call is bounded by ``deadline_ms``."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str,
        deadline_ms: int,
        on_corrupt: Callable[[], None] | None = None,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            # A brace in the prefix would become the Cluster hash tag instead of the session.
            raise ValueError("the key prefix must not contain '{' or '}'")
        if deadline_ms < 1:
            raise ValueError("deadline_ms must be >= 1")
        self._client = client
        self._prefix = prefix
        self._deadline_s = deadline_ms / 1000
        self._on_corrupt = on_corrupt

    def grant_key(self, session_key: str, level: str) -> str:
        return f"{self._prefix}g:{{{session_key}}}:{level}"

    def _corrupt(self) -> None:
        if self._on_corrupt is not None:
            self._on_corrupt()

    async def read(self, session_key: str, levels: Sequence[str]) -> SessionSnapshot:
        """The session's grants for ``levels``, in one MGET, within the deadline.

        Undecodable values (and keys of another type, which MGET reports as absent) are
        skipped; the undecodable ones are reported to ``on_corrupt``.
        """
        if not levels:
            return EMPTY_SESSION
        keys = [self.grant_key(session_key, level) for level in levels]
        try:
            async with asyncio.timeout(self._deadline_s):
                values: list[bytes | str | None] = await self._client.mget(keys)
        except (RedisError, OSError) as exc:  # asyncio's TimeoutError is an OSError
            raise StoreError(f"session read failed: {type(exc).__name__}") from exc
        grants: list[Grant] = []
        for level, raw in zip(levels, values, strict=True):
            if raw is None:
                continue
            grant = decode_grant(raw, level)
            if grant is None:
                self._corrupt()
            else:
                grants.append(grant)
        return SessionSnapshot(grants=tuple(grants)) if grants else EMPTY_SESSION

    async def write_grant(self, session_key: str, grant: Grant, now: int) -> None:
        """Record ``grant``; Redis expires it at ``grant.expires_at`` (TTL from ``now``)."""
        ttl = grant.expires_at - now
        if ttl < 1:
            raise ValueError("refusing to store a grant that has already expired")
        key = self.grant_key(session_key, grant.level)
        await self._call("grant write", self._client.set(key, encode_grant(grant), ex=ttl))

    async def revoke_session(self, session_key: str, levels: Sequence[str]) -> int:
        """Delete the session's grants for ``levels``; returns how many existed."""
        if not levels:
            return 0
        keys = [self.grant_key(session_key, level) for level in levels]
        deleted: int = await self._call("revoke", self._client.delete(*keys))
        return deleted

    async def put_state(self, state_id: str, payload: Mapping[str, Any], ttl_s: int) -> None:
        """Store one-time step-up state; an id already in use is refused (SET NX)."""
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        value = json.dumps(dict(payload), separators=(",", ":")).encode()
        key = state_key(self._prefix, state_id)
        stored = await self._call("state write", self._client.set(key, value, ex=ttl_s, nx=True))
        if not stored:
            raise StoreError("step-up state id already in use")

    async def take_state(self, state_id: str) -> dict[str, Any] | None:
        """Consume the state atomically (GETDEL, Redis >= 6.2): only one caller gets it."""
        key = state_key(self._prefix, state_id)
        raw: bytes | None = await self._call("state take", self._client.getdel(key))
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict):
            self._corrupt()
            return None
        return doc

    async def ping(self) -> bool:
        """For /readyz: whether the store answers within the deadline. Never raises."""
        try:
            async with asyncio.timeout(self._deadline_s):
                return bool(await self._client.ping())
        except Exception:  # readiness is a yes/no; the reason is in the error counters
            return False

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, what: str, awaitable: Any) -> Any:
        try:
            async with asyncio.timeout(self._deadline_s):
                return await awaitable
        except (RedisError, OSError) as exc:
            raise StoreError(f"{what} failed: {type(exc).__name__}") from exc
