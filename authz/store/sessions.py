"""The Redis session store: what a Check reads (one round trip), grants, sessions, one-time
step-up state.

Key layout. ``P`` is ``RedisSettings.key_prefix`` (e.g. ``stepup:``), ``uk`` the user key
H(iss, sub) and ``sk`` the session key H(iss, sub, sid) (``authz.core.session``)::

    key                        type    value                                  TTL
    P u:{uk}:g:<sk>:<level>    string  E(grant, compact JSON)                 until grant expiry
    P u:{uk}:r:<sk>            string  revoked at (unix s); present = revoked revocation_ttl_s
    P u:{uk}:rb                string  revoked before (unix s; iat < it: no;  revocation_ttl_s
                                       unreadable: every token refused)
    P u:{uk}:ss                hash    sk -> {created, last_seen, ip: E(ip), device: E(device),
                                       levels}
                                       at most max_sessions (least recently seen evicted)
                                                                              session_ttl_s *
    P u:{uk}:dv                hash    F(device id) -> last seen; <= max_devices
                                                                              history_ttl_s *
    P u:{uk}:ip                hash    F(ip) -> last seen; <= max_ips         history_ttl_s *
    P u:{uk}:lv                hash    level -> first allowed at              history_ttl_s *
    P u:{uk}:vc:<n>            string  sensitive checks in window n           2 * window
    P u:{uk}:ls                string  E(last allowed sighting                session_ttl_s *
                                       "ts,ip sk device-tag,lat,lon"; before: "ts,ip,lat,lon")
    P st:<sha256(state id)>    string  E(one-time step-up state, JSON)        state lifetime

    * refreshed on every write
    E(x): AES-256-GCM, ``v1.<kid>.<b64url>``, bound to its key name (+ field, sub-field)
    F(x): HMAC-SHA256 fingerprint scoped to the user (``authz.store.crypto``)

- ``{uk}`` is the Redis Cluster hash tag of every per-user key, so each script below touches
  one slot; the keys are passed in ``KEYS`` (the revoke script derives grant keys from the
  user's key base, which carries the same tag).
- ``read_check`` is one EVALSHA (``lua/read_check.lua``): grants, revocations, whether the
  device / IP are known, whether the level was seen before, the last sighting, and for a
  sensitive route it INCRs the current velocity window. NOSCRIPT (a restarted or flushed
  server) is retried once with EVAL under the same deadline and counted (``on_noscript``).
- Velocity is a sliding window estimated from two fixed windows:
  ``ceil(previous * (1 - elapsed fraction of the current window) + current)``.
- Grant value: ``{"v":1,"level","acr","amr":[...],"auth_time","exp","iat"[,"device"][,"ip"]}``.
  No tokens, no codes. The whole grant is encrypted and bound to its key name, so the raw
  device / IP it is bound to come back for the comparison in ``honoured_here`` and for
  ``list_sessions``, and a grant cannot be forged, edited or moved to another session or
  level by anyone who can write Redis but lacks the key.
- Nothing sensitive in clear (``redis-cli`` shows none of it): device ids and IPs appear only
  as user-scoped keyed hashes (field names, compared by equality inside the scripts) or
  encrypted; the step-up state (nonce, PKCE verifier, return path, device, IP) and the last
  sighting (IP, coordinates) are encrypted. Level names, timestamps, counters and revocation
  marks stay in clear: the scripts order, bound and expire by them, and they say nothing
  about who or where. The user and session are only (unkeyed) hashes in key names.
- The raw step-up state id also travels in the browser's cookie and the OIDC ``state``
  parameter, so it is never used as a key.

Every failure (a Redis error, an ``OSError``, a missed deadline) raises ``StoreError``; a
read never turns a failure into an empty state, because "nothing recorded" and "could not
look" are both denies but only the second is counted and audited as a fail-closed event.
Undecodable values (including anything that fails decryption: tampered, moved, or written
under a kid no longer in the ring) are skipped and reported to ``on_corrupt``.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from authz.core.session import Evidence, Grant, Sighting, UserState, device_tag
from authz.errors import StoreError
from authz.store.crypto import FieldCipher
from authz.store.interfaces import SessionInfo

# What a failed client call raises: redis-py's errors, RedisClusterException (e.g.
# SlotNotCoveredError while a cluster primary is down; not a RedisError), OSError (asyncio's
# TimeoutError included), and AttributeError from redis-py's async cluster client when a
# failing node's connection is closed under a concurrent writer ('NoneType' ...
# 'writelines'). Each is a store failure: counted, fail closed, never an internal error.
_CLIENT_ERRORS = (RedisError, RedisClusterException, OSError, AttributeError)

GRANT_FORMAT_VERSION = 1
REVOKED_ALWAYS = 2**62  # an unreadable revoked-before marker: no token was issued after it


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """Retention and bounds of the per-user state (see the key table above)."""

    session_ttl_s: int = 86_400  # the longest an access token lives: sessions index, sightings
    # Revocation markers live at least this long: the longest a session (and the tokens
    # refreshed within it) may last at the IdP. Never shorter than session_ttl_s.
    revocation_ttl_s: int = 30 * 86_400
    history_ttl_s: int = 90 * 86_400  # known devices / IPs, levels seen
    max_sessions: int = 50
    max_devices: int = 20
    max_ips: int = 50

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.revocation_ttl_s < self.session_ttl_s:
            raise ValueError("revocation_ttl_s must be >= session_ttl_s")


# --- values -------------------------------------------------------------------------------


def encode_grant(grant: Grant) -> bytes:
    ev = grant.evidence
    doc: dict[str, Any] = {
        "v": GRANT_FORMAT_VERSION,
        "level": grant.level,
        "acr": ev.acr,
        "amr": list(ev.amr),
        "auth_time": ev.auth_time,
        "exp": grant.expires_at,
        "iat": grant.issued_at,
    }
    if grant.device is not None:
        doc["device"] = grant.device
    if grant.ip is not None:
        doc["ip"] = grant.ip
    return json.dumps(doc, separators=(",", ":")).encode()


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # bool is an int subclass


def _opt_str(v: object) -> bool:
    return v is None or isinstance(v, str)


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
    device, ip = doc.get("device"), doc.get("ip")
    if (
        doc.get("level") != level  # a value copied to another level's key is not evidence
        or not _opt_str(acr)
        or not (isinstance(amr, list) and all(isinstance(a, str) for a in amr))
        or not (auth_time is None or _int(auth_time))
        or not (_int(exp) and _int(iat))
        or not (_opt_str(device) and _opt_str(ip))
    ):
        return None
    assert isinstance(exp, int) and isinstance(iat, int)  # for mypy: checked just above
    return Grant(
        level=level,
        evidence=Evidence(acr=acr, amr=tuple(amr), auth_time=auth_time),
        expires_at=exp,
        issued_at=iat,
        device=device,
        ip=ip,
    )


def encode_sighting(s: Sighting) -> str:
    """``at,ip[ session device],lat,lon``: the session key and the device tag (``-``: none)
    ride in the IP's field, which no IP's text contains a space or a comma of, so the
    previous release (which split on commas into exactly four fields and read only the
    time and the place) still reads a sighting written by this one."""
    lat = "" if s.lat is None else repr(s.lat)
    lon = "" if s.lon is None else repr(s.lon)
    where = s.ip if s.session is None else f"{s.ip} {s.session} {s.device or '-'}"
    return f"{s.at},{where},{lat},{lon}"


def decode_sighting(raw: bytes | str) -> Sighting | None:
    """The sighting in ``raw``; one without a session (the earlier format) has
    ``session=None``. None when malformed."""
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        at, where, lat, lon = text.split(",")
        ip, *by = where.split(" ")
        if by and (len(by) != 2 or not all(by)):
            return None
        return Sighting(
            at=int(at),
            ip=ip,
            lat=float(lat) if lat else None,
            lon=float(lon) if lon else None,
            session=by[0] if by else None,
            device=by[1] if by and by[1] != "-" else None,
        )
    except (ValueError, UnicodeDecodeError):
        return None


def decode_session_entry(raw: bytes | str) -> dict[str, Any] | None:
    """A sessions-index value, normalised; None when malformed."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    created, last_seen = doc.get("created"), doc.get("last_seen")
    levels = doc.get("levels")
    if isinstance(levels, dict) and not levels:
        levels = []  # Lua's cjson encodes an empty list as {}
    if not (
        _int(created)
        and _int(last_seen)
        and isinstance(levels, list)
        and all(isinstance(x, str) for x in levels)
        and _opt_str(doc.get("ip"))
        and _opt_str(doc.get("device"))
    ):
        return None
    return {
        "created": created,
        "last_seen": last_seen,
        "ip": doc.get("ip"),
        "device": doc.get("device"),
        "levels": levels,
    }


def velocity_estimate(current: int, previous: int, now: int, window_s: int) -> int:
    """Sliding-window count from two fixed windows, rounded up (integer arithmetic)."""
    elapsed = now % window_s
    return -(-(previous * (window_s - elapsed) + current * window_s) // window_s)


def _entry_context(sessions_key: str, sk: str, name: str) -> str:
    return f"{sessions_key}#{sk}#{name}"


def state_key(prefix: str, state_id: str) -> str:
    return f"{prefix}st:{hashlib.sha256(state_id.encode()).hexdigest()}"


def _check_part(name: str, value: str) -> None:
    # A brace would move the Cluster hash tag; a colon would make keys ambiguous.
    if not value or any(c in value for c in "{}:"):
        raise ValueError(f"{name} must be non-empty and free of '{{', '}}' and ':'")


class UserKeys:
    """The key names of one user (see the module docstring)."""

    __slots__ = ("base",)

    def __init__(self, prefix: str, user: str) -> None:
        _check_part("user", user)
        self.base = f"{prefix}u:{{{user}}}:"

    def grant(self, session: str, level: str) -> str:
        return f"{self.base}g:{session}:{level}"

    def revoked(self, session: str) -> str:
        return f"{self.base}r:{session}"

    def velocity(self, window_index: int) -> str:
        return f"{self.base}vc:{window_index}"

    @property
    def revoked_before(self) -> str:
        return self.base + "rb"

    @property
    def sessions(self) -> str:
        return self.base + "ss"

    @property
    def devices(self) -> str:
        return self.base + "dv"

    @property
    def ips(self) -> str:
        return self.base + "ip"

    @property
    def levels_seen(self) -> str:
        return self.base + "lv"

    @property
    def last_sighting(self) -> str:
        return self.base + "ls"


class Script:
    """A Lua script from ``authz/store/lua`` and its SHA1 (what EVALSHA names it by)."""

    __slots__ = ("name", "sha", "text")

    def __init__(
        self, name: str, *, with_common: bool = False, functions: Sequence[str] = ()
    ) -> None:
        lua = resources.files("authz.store").joinpath("lua")
        text = lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")
        # Another script's body as ``local function <name>(KEYS, ARGV)`` (note_allow_batch).
        for fn in reversed(functions):
            body = lua.joinpath(f"{fn}.lua").read_text(encoding="utf-8")
            text = f"local function {fn}(KEYS, ARGV)\n{body}\nend\n" + text
        if with_common:
            text = lua.joinpath("common.lua").read_text(encoding="utf-8") + "\n" + text
        self.name = name
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


_READ_CHECK = Script("read_check")
_WRITE_GRANT = Script("write_grant", with_common=True)
_NOTE_ALLOW = Script("note_allow", with_common=True)
_NOTE_ALLOW_BATCH = Script("note_allow_batch", with_common=True, functions=("note_allow",))
_NOTE_KEYS, _NOTE_ARGS = 5, 13  # per lesson, note_allow.lua's
_NOTE_BATCH_MAX = 64  # lessons per call: bounds one script's run time in Redis
_REVOKE = Script("revoke", with_common=True)


def _retrieved(task: asyncio.Task[None]) -> None:
    """A batch write's own failure is its lessons' (set on their futures): nothing to log."""
    if not task.cancelled():
        task.exception()


def _flag(v: object) -> bool | None:
    if v is None or v is False:
        return None
    n = int(v)  # type: ignore[call-overload]
    return None if n < 0 else bool(n)


def _opt_int(raw: object) -> int | None:
    if raw is None or raw is False:
        return None
    try:
        return int(raw)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        return None


class RedisSessionStore:
    """Per-user state and step-up state in Redis/Valkey. Every call is bounded by
    ``deadline_ms``."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str,
        deadline_ms: int,
        limits: StoreLimits | None = None,
        on_corrupt: Callable[[], None] | None = None,
        on_noscript: Callable[[], None] | None = None,
        cipher: FieldCipher | None = None,
        script_client: Any = None,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            # A brace in the prefix would become the Cluster hash tag instead of the user.
            raise ValueError("the key prefix must not contain '{' or '}'")
        if deadline_ms < 1:
            raise ValueError("deadline_ms must be >= 1")
        self._client = client
        self._prefix = prefix
        self._deadline_s = deadline_ms / 1000
        self.limits = limits or StoreLimits()
        self._on_corrupt = on_corrupt
        self._on_noscript = on_noscript
        # What runs the scripts (EVALSHA/EVAL): authz.store.fastredis.FastRedis on the Check
        # path for a plain URL (a few us per call against ~200 us for redis-py), else client.
        self._scripts = script_client if script_client is not None else client
        # FastRedis bounds a call by a timer on its reply that forgives the loop's stalls;
        # redis-py (Sentinel, Cluster) by asyncio.timeout.
        self._execute_at = getattr(self._scripts, "execute_at", None)
        # note_allow lessons waiting for this loop pass's batch (FastRedis only).
        self._notes: list[tuple[list[str], tuple[Any, ...], asyncio.Future[None]]] = []
        # No cipher: a per-process key (tests, tools); the service always passes its own.
        self._cipher = cipher if cipher is not None else FieldCipher.generate()

    @property
    def cipher(self) -> FieldCipher:
        return self._cipher

    def on_client(self, client: aioredis.Redis, *, deadline_ms: int) -> RedisSessionStore:
        """The same store (prefix, limits, cipher, counters) on another client bounded by
        another deadline: the step-up endpoints', off the Check path (its socket timeouts
        follow that deadline too). Its ``aclose`` closes that client only."""
        if deadline_ms < 1:
            raise ValueError("deadline_ms must be >= 1")
        other = copy.copy(self)
        other._client = other._scripts = client
        other._deadline_s = deadline_ms / 1000
        return other

    def keys(self, user: str) -> UserKeys:
        return UserKeys(self._prefix, user)

    def _corrupt(self) -> None:
        if self._on_corrupt is not None:
            self._on_corrupt()

    # -- values: encryption and fingerprints (see the module docstring) -------------------

    def _fps(self, purpose: str, user: str, value: str | None) -> tuple[str, str]:
        """(active, previous-kid) fingerprints of ``value``; '' for none."""
        if not value:
            return "", ""
        c = self._cipher
        return (
            c.fingerprint(purpose, user, value),
            c.previous_fingerprint(purpose, user, value) or "",
        )

    def _seal_opt(self, value: str | None, context: str) -> str:
        return self._cipher.encrypt(value, context) if value else ""

    def _open_grant(self, key: str, raw: bytes | str, level: str) -> Grant | None:
        plain = self._cipher.decrypt(raw, key)
        return None if plain is None else decode_grant(plain, level)

    def _open_entry(self, sessions_key: str, sk: str, raw: bytes | str) -> dict[str, Any] | None:
        entry = decode_session_entry(raw)
        if entry is None:
            return None
        for name in ("ip", "device"):
            if entry[name] is not None:
                entry[name] = self._cipher.decrypt_text(
                    entry[name], _entry_context(sessions_key, sk, name)
                )
                if entry[name] is None:
                    self._corrupt()  # the entry still lists; the unreadable part is blank
        return entry

    async def _eval(
        self, script: Script, keys: Sequence[str], args: Sequence[str | bytes | int]
    ) -> Any:
        """EVALSHA; on NOSCRIPT one EVAL (which also caches it). Caller holds the deadline."""
        try:
            return await self._scripts.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            if self._on_noscript is not None:
                self._on_noscript()
            return await self._scripts.eval(script.text, len(keys), *keys, *args)

    async def _script(
        self, what: str, script: Script, keys: Sequence[str], args: Sequence[str | bytes | int]
    ) -> Any:
        try:
            if self._execute_at is not None:
                return await self._eval_at(script, keys, args)
            async with asyncio.timeout(self._deadline_s):
                return await self._eval(script, keys, args)
        except _CLIENT_ERRORS as exc:
            raise StoreError(f"{what} failed: {type(exc).__name__}") from exc

    async def _eval_at(
        self, script: Script, keys: Sequence[str], args: Sequence[str | bytes | int]
    ) -> Any:
        """``_eval`` over FastRedis: EVALSHA, on NOSCRIPT one EVAL, both within the one
        deadline (a loop stall does not count against it: ``FastRedis.execute_at``)."""
        execute_at = self._execute_at
        assert execute_at is not None
        when = asyncio.get_running_loop().time() + self._deadline_s
        try:
            return await execute_at(when, "EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            if self._on_noscript is not None:
                self._on_noscript()
            return await execute_at(when, "EVAL", script.text, len(keys), *keys, *args)

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
        """Everything a Check needs about ``user`` / ``session``, in one round trip.

        ``levels`` are the grant levels to look up; ``level`` the one being checked (for
        "first access to a level"). When ``sensitive``, this check is counted in the
        user's velocity window of ``window_s`` seconds and the estimate returned. Grants
        issued before the user's revoked-before mark are dropped.
        """
        _check_part("session", session)
        if window_s < 1:
            raise ValueError("window_s must be >= 1")
        k = self.keys(user)
        idx = now // window_s
        keys = [
            k.revoked(session),
            k.revoked_before,
            k.devices,
            k.ips,
            k.levels_seen,
            k.last_sighting,
            k.velocity(idx),
            k.velocity(idx - 1),
            *(k.grant(session, lv) for lv in levels),
        ]
        dev_fp, dev_prev = self._fps("device", user, device)
        ip_fp, ip_prev = self._fps("ip", user, ip)
        args = (dev_fp, ip_fp, level, "1" if sensitive else "0", 2 * window_s, dev_prev, ip_prev)
        reply = await self._script("session read", _READ_CHECK, keys, args)
        try:
            (revoked, rb_raw, dev_known, ip_known, seen, ls_raw, cur, prev_raw, *grant_values) = (
                reply
            )
        except (TypeError, ValueError) as exc:
            raise StoreError("session read: unexpected script reply") from exc
        revoked_before = _opt_int(rb_raw)
        if rb_raw not in (None, False) and revoked_before is None:
            # A marker that is there but cannot be read (not an integer, the wrong type)
            # means revoked: every token of the user is refused until it is rewritten.
            self._corrupt()
            revoked_before = REVOKED_ALWAYS
        grants: list[Grant] = []
        for lv, raw in zip(levels, grant_values, strict=True):
            if raw is None or raw is False:
                continue
            grant = self._open_grant(k.grant(session, lv), raw, lv)
            if grant is None:
                self._corrupt()
            elif revoked_before is None or grant.issued_at >= revoked_before:
                grants.append(grant)
        last_seen: Sighting | None = None
        if ls_raw not in (None, False):
            plain = self._cipher.decrypt(ls_raw, k.last_sighting)
            last_seen = None if plain is None else decode_sighting(plain)
            if last_seen is None:
                self._corrupt()
        velocity = 0
        if sensitive:
            current = int(cur)
            if current < 0:  # the counter key held junk: count this check alone
                self._corrupt()
                current = 1
            previous = _opt_int(prev_raw)
            if previous is None and prev_raw not in (None, False):
                self._corrupt()
            velocity = velocity_estimate(current, previous or 0, now, window_s)
        return UserState(
            grants=tuple(grants),
            session_revoked=bool(revoked),
            revoked_before=revoked_before,
            device_known=_flag(dev_known),
            ip_known=_flag(ip_known),
            level_seen=bool(seen),
            velocity=velocity,
            last_seen=last_seen,
        )

    async def write_grant(
        self, user: str, session: str, grant: Grant, now: int, *, remember_device: bool = True
    ) -> None:
        """Record ``grant`` (TTL until ``grant.expires_at``), its sessions-index entry and,
        with ``remember_device``, the grant's device and IP as known for the user."""
        _check_part("session", session)
        ttl = grant.expires_at - now
        if ttl < 1:
            raise ValueError("refusing to store a grant that has already expired")
        k, lim = self.keys(user), self.limits
        gkey = k.grant(session, grant.level)
        keys = [gkey, k.sessions, k.devices, k.ips]
        dev_fp, dev_prev = self._fps("device", user, grant.device)
        ip_fp, ip_prev = self._fps("ip", user, grant.ip)
        args = (
            self._cipher.encrypt(encode_grant(grant), gkey),
            ttl,
            session,
            now,
            grant.level,
            self._seal_opt(grant.device, _entry_context(k.sessions, session, "device")),
            self._seal_opt(grant.ip, _entry_context(k.sessions, session, "ip")),
            "1" if remember_device else "0",
            lim.max_sessions,
            lim.session_ttl_s,
            lim.max_devices,
            lim.max_ips,
            lim.history_ttl_s,
            dev_fp,
            ip_fp,
            dev_prev,
            ip_prev,
        )
        await self._script("grant write", _WRITE_GRANT, keys, args)

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
        """After an allow, off the Check's critical path: level first seen, last sighting
        (only with an IP; it names ``session`` and the device's tag), session last_seen;
        refreshes a known device's / IP's recency."""
        _check_part("session", session)
        k, lim = self.keys(user), self.limits
        seen = Sighting(now, ip, lat, lon, session, device_tag(device)) if ip else None
        sighting = (
            "" if seen is None else self._cipher.encrypt(encode_sighting(seen), k.last_sighting)
        )
        keys = [k.levels_seen, k.last_sighting, k.sessions, k.devices, k.ips]
        dev_fp, dev_prev = self._fps("device", user, device)
        ip_fp, ip_prev = self._fps("ip", user, ip)
        args = (
            level,
            now,
            sighting,
            session,
            self._seal_opt(device, _entry_context(k.sessions, session, "device")),
            self._seal_opt(ip, _entry_context(k.sessions, session, "ip")),
            lim.max_sessions,
            lim.session_ttl_s,
            lim.history_ttl_s,
            dev_fp,
            ip_fp,
            dev_prev,
            ip_prev,
        )
        if self._execute_at is None:  # redis-py (Sentinel, Cluster): one call a lesson
            await self._script("note allow", _NOTE_ALLOW, keys, args)
            return
        await self._note_batched(keys, args)

    def _note_batched(self, keys: list[str], args: tuple[Any, ...]) -> asyncio.Future[None]:
        """Queue a lesson for this loop pass's batch: the lessons of the allows decided in
        one pass go to Redis in one EVALSHA (note_allow_batch.lua), beside that pass's
        reads, instead of one round trip each."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if not self._notes:
            loop.call_soon(self._flush_notes)
        self._notes.append((keys, args, fut))
        return fut

    def _flush_notes(self) -> None:
        notes, self._notes = self._notes, []
        for i in range(0, len(notes), _NOTE_BATCH_MAX):
            batch = notes[i : i + _NOTE_BATCH_MAX]
            task = asyncio.ensure_future(self._write_notes(batch))
            task.add_done_callback(_retrieved)

    async def _write_notes(
        self, batch: list[tuple[list[str], tuple[Any, ...], asyncio.Future[None]]]
    ) -> None:
        keys: list[str] = []
        args: list[Any] = []
        for k, a, _ in batch:
            keys += k
            args += a
        failure: str | None = "note allow: not written"  # unless the script answers
        try:
            script = _NOTE_ALLOW if len(batch) == 1 else _NOTE_ALLOW_BATCH
            await self._script("note allow", script, keys, args)
            failure = None
        except StoreError as exc:
            failure = str(exc)
        finally:  # every lesson gets its answer, even when this task is cancelled
            for _, _, fut in batch:
                if fut.done():
                    continue
                if failure is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(StoreError(failure))

    async def revoke_session(self, user: str, session: str, now: int) -> bool:
        """Mark the session revoked (refused by the next Check), delete its grants and its
        index entry. True when the session was in the index."""
        _check_part("session", session)
        k = self.keys(user)
        args = (now, self.limits.revocation_ttl_s, session, k.base)
        done = await self._script("revoke", _REVOKE, [k.sessions, k.revoked(session)], args)
        return bool(done)

    async def revoke_user(self, user: str, now: int) -> int:
        """Refuse every token issued before ``now``, delete every indexed session's grants
        and the index. Returns how many indexed sessions there were."""
        k = self.keys(user)
        args = (now, self.limits.revocation_ttl_s, "", k.base)
        n = await self._script("revoke", _REVOKE, [k.sessions, k.revoked_before], args)
        return int(n)

    async def list_sessions(self, user: str) -> list[SessionInfo]:
        """The user's indexed sessions, most recently seen first, with their live grants
        (two round trips: the index, then one MGET of its grant keys)."""
        k = self.keys(user)
        try:
            async with asyncio.timeout(self._deadline_s):
                raw: dict[Any, Any] = await self._client.hgetall(k.sessions)
                entries: list[tuple[str, dict[str, Any]]] = []
                for sk_raw, value in raw.items():
                    sk = sk_raw.decode()
                    entry = self._open_entry(k.sessions, sk, value)
                    if entry is None:
                        self._corrupt()
                        continue
                    entries.append((sk, entry))
                gkeys = [(sk, lv) for sk, e in entries for lv in e["levels"]]
                values: list[Any] = (
                    await self._client.mget([k.grant(sk, lv) for sk, lv in gkeys]) if gkeys else []
                )
        except _CLIENT_ERRORS as exc:
            raise StoreError(f"list sessions failed: {type(exc).__name__}") from exc
        grants: dict[str, list[Grant]] = {}
        for (sk, lv), value in zip(gkeys, values, strict=True):
            if value is None:
                continue
            grant = self._open_grant(k.grant(sk, lv), value, lv)
            if grant is None:
                self._corrupt()
            else:
                grants.setdefault(sk, []).append(grant)
        out = [
            SessionInfo(
                session=sk,
                created=e["created"],
                last_seen=e["last_seen"],
                ip=e["ip"],
                device=e["device"],
                grants=tuple(grants.get(sk, ())),
            )
            for sk, e in entries
        ]
        out.sort(key=lambda s: (-s.last_seen, s.session))
        return out

    async def put_state(self, state_id: str, payload: Mapping[str, Any], ttl_s: int) -> None:
        """Store one-time step-up state; an id already in use is refused (SET NX)."""
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        key = state_key(self._prefix, state_id)
        value = self._cipher.encrypt(json.dumps(dict(payload), separators=(",", ":")), key)
        stored = await self._call("state write", self._client.set(key, value, ex=ttl_s, nx=True))
        if not stored:
            raise StoreError("step-up state id already in use")

    async def take_state(self, state_id: str) -> dict[str, Any] | None:
        """Consume the state atomically (GETDEL, Redis >= 6.2): only one caller gets it."""
        key = state_key(self._prefix, state_id)
        raw: bytes | None = await self._call("state take", self._client.getdel(key))
        if raw is None:
            return None
        plain = self._cipher.decrypt(raw, key)
        try:
            doc = None if plain is None else json.loads(plain)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict):
            self._corrupt()
            return None
        return doc

    async def remember_once(self, key: str, ttl_s: int) -> bool:
        """SET NX EX under ``{prefix}once:<key>``: True only for the first caller."""
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        done = await self._call(
            "remember", self._client.set(f"{self._prefix}once:{key}", b"1", ex=ttl_s, nx=True)
        )
        return bool(done)

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
        except _CLIENT_ERRORS as exc:
            raise StoreError(f"{what} failed: {type(exc).__name__}") from exc
