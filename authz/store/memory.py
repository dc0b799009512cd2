"""In-memory fakes behind the same interfaces as the real adapters.

For unit tests and ``policy explain``: no Redis, no network. They keep the real adapters'
semantics that callers rely on (TTL expiry, bounded lists, sliding-window velocity,
revocations, one-time state, refusal of expired grants, a fresh copy of every payload) and
can be switched to fail like a dead store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from authz.core.session import Grant, Sighting, UserState, device_tag
from authz.errors import StoreError
from authz.store.interfaces import SessionInfo
from authz.store.sessions import StoreLimits, velocity_estimate


@dataclass
class _Session:
    created: int
    last_seen: int
    ip: str | None = None
    device: str | None = None
    levels: list[str] = field(default_factory=list)


@dataclass
class _User:
    """One user's keys; each ``*_exp`` is that key's expiry on the store's clock."""

    grants: dict[tuple[str, str], tuple[Grant, float]] = field(default_factory=dict)
    revoked: dict[str, float] = field(default_factory=dict)
    revoked_before: tuple[int, float] | None = None
    sessions: dict[str, _Session] = field(default_factory=dict)
    sessions_exp: float = 0.0
    devices: dict[str, int] = field(default_factory=dict)
    devices_exp: float = 0.0
    ips: dict[str, int] = field(default_factory=dict)
    ips_exp: float = 0.0
    levels: dict[str, int] = field(default_factory=dict)
    levels_exp: float = 0.0
    velocity: dict[int, tuple[int, float]] = field(default_factory=dict)
    sighting: tuple[Sighting, float] | None = None

    def expire(self, t: float) -> None:
        """Drop what Redis would have expired by ``t``."""
        self.grants = {k: v for k, v in self.grants.items() if v[1] > t}
        self.revoked = {k: v for k, v in self.revoked.items() if v > t}
        self.velocity = {k: v for k, v in self.velocity.items() if v[1] > t}
        if self.revoked_before is not None and self.revoked_before[1] <= t:
            self.revoked_before = None
        if self.sighting is not None and self.sighting[1] <= t:
            self.sighting = None
        for name in ("sessions", "devices", "ips", "levels"):
            if getattr(self, f"{name}_exp") <= t:
                getattr(self, name).clear()


def _bound(entries: dict[str, Any], limit: int, keep: str, ts: Callable[[Any], int]) -> None:
    """Evict the oldest entries beyond ``limit`` (never ``keep``), as the Lua scripts do."""
    excess = len(entries) - limit
    if excess <= 0:
        return
    victims = sorted((k for k in entries if k != keep), key=lambda k: ts(entries[k]))
    for k in victims[:excess]:
        del entries[k]


class MemorySessionStore:
    """``RedisSessionStore`` in dicts, with an injectable clock.

    Entries expire on ``now()`` the way Redis expires keys on its own clock (the ``now``
    arguments are recorded in values and decide windows, as with Redis). Set ``fail`` to
    make every call raise ``StoreError`` (``ping`` returns False), to exercise the
    fail-closed paths. ``calls`` counts round trips (one per call, as with Redis).
    """

    def __init__(
        self,
        now: Callable[[], float] = time.time,
        *,
        fail: bool = False,
        limits: StoreLimits | None = None,
    ) -> None:
        self.now = now
        self.fail = fail
        self.closed = False
        self.calls = 0
        self.limits = limits or StoreLimits()
        self._users: dict[str, _User] = {}
        self._states: dict[str, tuple[str, float]] = {}
        self._once: dict[str, float] = {}

    def _enter(self) -> float:
        self.calls += 1
        if self.fail:
            raise StoreError("session store unavailable (MemorySessionStore.fail)")
        return self.now()

    def _user(self, user: str, t: float) -> _User:
        u = self._users.setdefault(user, _User())
        u.expire(t)
        return u

    async def read_check(
        self,
        *,
        user: str,
        session: str,
        levels: Sequence[str],
        level: str,
        device: str | None,
        ip: str | None,
        sensitive: bool,
        window_s: int,
        now: int,
    ) -> UserState:
        if window_s < 1:
            raise ValueError("window_s must be >= 1")
        t = self._enter()
        u = self._user(user, t)
        rb = u.revoked_before[0] if u.revoked_before is not None else None
        grants = tuple(
            entry[0]
            for lv in levels
            if (entry := u.grants.get((session, lv))) is not None
            and (rb is None or entry[0].issued_at >= rb)
        )
        velocity = 0
        if sensitive:
            idx = now // window_s
            count, exp = u.velocity.get(idx, (0, t + 2 * window_s))
            u.velocity[idx] = (count + 1, exp)
            prev = u.velocity.get(idx - 1, (0, 0.0))[0]
            velocity = velocity_estimate(count + 1, prev, now, window_s)
        return UserState(
            grants=grants,
            session_revoked=session in u.revoked,
            revoked_before=rb,
            device_known=None if not device else device in u.devices,
            ip_known=None if not ip else ip in u.ips,
            level_seen=level in u.levels,
            velocity=velocity,
            last_seen=u.sighting[0] if u.sighting is not None else None,
        )

    def _touch_session(
        self,
        u: _User,
        t: float,
        session: str,
        now: int,
        ip: str | None,
        device: str | None,
        level: str | None,
    ) -> None:
        s = u.sessions.get(session)
        if s is None:
            s = u.sessions[session] = _Session(created=now, last_seen=now)
            _bound(u.sessions, self.limits.max_sessions, session, lambda e: e.last_seen)
        s.last_seen = now
        s.ip = ip or s.ip
        s.device = device or s.device
        if level is not None and level not in s.levels:
            s.levels.append(level)
        u.sessions_exp = t + self.limits.session_ttl_s

    async def write_grant(
        self, user: str, session: str, grant: Grant, now: int, *, remember_device: bool = True
    ) -> None:
        ttl = grant.expires_at - now
        if ttl < 1:
            raise ValueError("refusing to store a grant that has already expired")
        t = self._enter()
        u = self._user(user, t)
        u.grants[(session, grant.level)] = (grant, t + ttl)
        self._touch_session(u, t, session, now, grant.ip, grant.device, grant.level)
        if remember_device:
            lim = self.limits
            if grant.device:
                u.devices[grant.device] = now
                _bound(u.devices, lim.max_devices, grant.device, lambda v: v)
                u.devices_exp = t + lim.history_ttl_s
            if grant.ip:
                u.ips[grant.ip] = now
                _bound(u.ips, lim.max_ips, grant.ip, lambda v: v)
                u.ips_exp = t + lim.history_ttl_s

    async def note_allow(
        self,
        *,
        user: str,
        session: str,
        level: str,
        ip: str | None,
        device: str | None,
        now: int,
        lat: float | None = None,
        lon: float | None = None,
    ) -> None:
        t = self._enter()
        u = self._user(user, t)
        lim = self.limits
        u.levels.setdefault(level, now)
        u.levels_exp = t + lim.history_ttl_s
        if ip:
            seen = Sighting(now, ip, lat, lon, session, device_tag(device))
            u.sighting = (seen, t + lim.session_ttl_s)
        self._touch_session(u, t, session, now, ip, device, None)
        if device and device in u.devices:
            u.devices[device] = now
            u.devices_exp = t + lim.history_ttl_s
        if ip and ip in u.ips:
            u.ips[ip] = now
            u.ips_exp = t + lim.history_ttl_s

    async def revoke_session(self, user: str, session: str, now: int) -> bool:
        t = self._enter()
        u = self._user(user, t)
        u.revoked[session] = t + self.limits.revocation_ttl_s
        entry = u.sessions.pop(session, None)
        if entry is None:
            return False
        for lv in entry.levels:
            u.grants.pop((session, lv), None)
        return True

    async def revoke_user(self, user: str, now: int) -> int:
        t = self._enter()
        u = self._user(user, t)
        prev = u.revoked_before[0] if u.revoked_before is not None else 0
        u.revoked_before = (max(prev, now), t + self.limits.revocation_ttl_s)
        n = len(u.sessions)
        for sk, entry in u.sessions.items():
            for lv in entry.levels:
                u.grants.pop((sk, lv), None)
        u.sessions.clear()
        return n

    async def list_sessions(self, user: str) -> list[SessionInfo]:
        t = self._enter()
        u = self._user(user, t)
        out = [
            SessionInfo(
                session=sk,
                created=s.created,
                last_seen=s.last_seen,
                ip=s.ip,
                device=s.device,
                grants=tuple(g[0] for lv in s.levels if (g := u.grants.get((sk, lv)))),
            )
            for sk, s in u.sessions.items()
        ]
        out.sort(key=lambda s: (-s.last_seen, s.session))
        return out

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

    async def remember_once(self, key: str, ttl_s: int) -> bool:
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        t = self._enter()
        seen = self._once.get(key)
        if seen is not None and seen > t:
            return False
        self._once[key] = t + ttl_s
        return True

    async def ping(self) -> bool:
        return not self.fail

    async def aclose(self) -> None:
        self.closed = True
