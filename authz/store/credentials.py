"""The passkey credential registry, transaction grants and ceremony state, in Redis.

Key layout (``P`` the key prefix, ``uk`` the user key H(iss, sub), ``sk`` the session key;
see ``authz.store.sessions`` for the rest of a user's keys, which share the ``{uk}`` tag)::

    key                          type    value                                TTL
    P u:{uk}:pk                  hash    handle -> E(credential record JSON)  none
    P u:{uk}:tx:<sk>:<digest>    string  E(transaction grant JSON)            grant lifetime
    P pk:st:<sha256(state id)>   string  E(ceremony state JSON)               challenge TTL

    handle: hex SHA-256 of the credential id (first 32 digits). Unkeyed on purpose: a
    credential has no TTL, and a keyed name would be lost at the next key rotation.
    E(x): AES-256-GCM bound to the key name (and the handle): ``authz.store.crypto``.

Credentials are durable state, unlike everything else the service keeps: losing them locks
users out of their second factor. ``durability`` reads INFO to tell whether this Redis
persists (AOF or RDB) and will not evict keys without a TTL. Records never expire; they are
re-sealed under the active key whenever they are written (every authentication moves the
signature counter), and ``reseal`` rewrites the rest before an old key leaves the ring.

A record is the public half only: credential id, COSE public key, AAGUID, counter, flags.
Nothing here lets anyone sign; sealing keeps an operator with ``redis-cli`` from editing
the counter back (to let a clone pass) or swapping a public key in.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from authz.core.encoding import b64u, unb64u
from authz.core.session import Evidence, Grant
from authz.errors import StoreError
from authz.store.crypto import FieldCipher
from authz.store.sessions import Script, UserKeys, decode_grant

_CLIENT_ERRORS = (RedisError, RedisClusterException, OSError, AttributeError)  # as sessions.py
RECORD_VERSION = 1

_ADD = Script("credential_add")
_CAS = Script("credential_cas")
_TAKE = Script("credential_take")


def handle_of(credential_id: bytes) -> str:
    return hashlib.sha256(credential_id).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Credential:
    """One registered WebAuthn credential (its public half)."""

    credential_id: bytes
    public_key: bytes  # COSE_Key, as in the attested credential data
    sign_count: int
    aaguid: str  # 8-4-4-4-12 lower-case; all zeros when the authenticator withheld it
    issuer: str
    subject: str
    rp_id: str
    created_at: int
    name: str = "Security key"
    backup_eligible: bool = False  # BE: may be synced to other devices (a synced passkey)
    backup_state: bool = False  # BS: currently backed up
    transports: tuple[str, ...] = ()
    attestation_fmt: str = "none"
    certified: bool = False  # the attestation chained to a FIDO MDS entry, verified
    user_verified: bool = False  # UV at enrolment
    enrolled_level: str | None = None  # the step-up level that allowed the enrolment
    enrolled_session: str | None = None  # the session key it was enrolled from
    last_used_at: int | None = None

    @property
    def device_bound(self) -> bool:
        return not self.backup_eligible

    @property
    def handle(self) -> str:
        return handle_of(self.credential_id)

    @property
    def id_b64(self) -> str:
        return b64u(self.credential_id)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["v"] = RECORD_VERSION
        doc["credential_id"] = b64u(self.credential_id)
        doc["public_key"] = b64u(self.public_key)
        doc["transports"] = list(self.transports)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Credential:
        """Raises ValueError on anything malformed (a record, an export line, an import)."""
        if doc.get("v") != RECORD_VERSION:
            raise ValueError("unknown credential record version")
        try:
            cred = cls(
                credential_id=unb64u(_s(doc, "credential_id")),
                public_key=unb64u(_s(doc, "public_key")),
                sign_count=_i(doc, "sign_count"),
                aaguid=_s(doc, "aaguid"),
                issuer=_s(doc, "issuer"),
                subject=_s(doc, "subject"),
                rp_id=_s(doc, "rp_id"),
                created_at=_i(doc, "created_at"),
                name=_s(doc, "name"),
                backup_eligible=_b(doc, "backup_eligible"),
                backup_state=_b(doc, "backup_state"),
                transports=tuple(_str_list(doc.get("transports", []))),
                attestation_fmt=_s(doc, "attestation_fmt"),
                certified=_b(doc, "certified"),
                user_verified=_b(doc, "user_verified"),
                enrolled_level=_opt_s(doc, "enrolled_level"),
                enrolled_session=_opt_s(doc, "enrolled_session"),
                last_used_at=_opt_i(doc, "last_used_at"),
            )
        except (KeyError, TypeError, ValueError) as exc:  # binascii.Error is a ValueError
            raise ValueError(f"malformed credential record: {exc}") from exc
        if not cred.credential_id or not cred.public_key or len(cred.credential_id) > 1023:
            raise ValueError("malformed credential record: empty or oversized id or key")
        return cred


def _s(doc: Mapping[str, Any], name: str) -> str:
    v = doc[name]
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a string")
    return v


def _opt_s(doc: Mapping[str, Any], name: str) -> str | None:
    v = doc.get(name)
    if v is not None and not isinstance(v, str):
        raise TypeError(f"{name} must be a string")
    return v


def _i(doc: Mapping[str, Any], name: str) -> int:
    v = doc[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TypeError(f"{name} must be a non-negative integer")
    return v


def _opt_i(doc: Mapping[str, Any], name: str) -> int | None:
    return None if doc.get(name) is None else _i(doc, name)


def _b(doc: Mapping[str, Any], name: str) -> bool:
    v = doc.get(name, False)
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be true or false")
    return v


def _str_list(v: object) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError("transports must be a list of strings")
    return v


@dataclass(frozen=True, slots=True)
class TransactionGrant:
    """A grant for one request: the level's grant plus the digest it is bound to."""

    grant: Grant
    digest: str

    def to_json(self) -> bytes:
        g, ev = self.grant, self.grant.evidence
        doc = {
            "v": RECORD_VERSION,
            "level": g.level,
            "acr": ev.acr,
            "amr": list(ev.amr),
            "auth_time": ev.auth_time,
            "exp": g.expires_at,
            "iat": g.issued_at,
            "device": g.device,
            "ip": g.ip,
            "digest": self.digest,
        }
        return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Durability:
    """What INFO says about the Redis holding credentials."""

    aof: bool | None
    rdb: bool | None
    eviction_policy: str | None
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems


# Policies that may evict a key without a TTL (every credential): allkeys-*.
_EVICTS_PERSISTENT = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


def assess_durability(persistence: Mapping[str, Any], memory: Mapping[str, Any]) -> Durability:
    """From ``INFO persistence`` and ``INFO memory`` (as redis-py parses them)."""
    aof_raw, policy_raw = persistence.get("aof_enabled"), memory.get("maxmemory_policy")
    aof = None if aof_raw is None else str(aof_raw) == "1"
    # rdb_saves / rdb_last_save_time say little about whether a save schedule exists;
    # Redis 7+ and Valkey report it in INFO persistence as "rdb_saves" only after a save,
    # so the schedule comes from CONFIG (see RedisCredentialStore.durability).
    rdb_raw = persistence.get("stepup_rdb_schedule")
    rdb = None if rdb_raw is None else bool(rdb_raw)
    policy = None if policy_raw is None else str(policy_raw)
    problems: list[str] = []
    if aof is None and rdb is None:
        problems.append("persistence unknown (INFO and CONFIG did not say)")
    elif not aof and not rdb:
        problems.append("no persistence: appendonly is off and no RDB save schedule")
    elif not aof:
        problems.append("RDB snapshots only: enrolments since the last snapshot can be lost")
    if policy is None:
        problems.append("eviction policy unknown")
    elif policy in _EVICTS_PERSISTENT:
        problems.append(f"maxmemory-policy {policy} may evict credentials")
    return Durability(aof, rdb, policy, tuple(problems))


class RedisCredentialStore:
    """Credentials, transaction grants and ceremony state. Every call is bounded by
    ``deadline_ms`` and raises ``StoreError`` on any failure (callers deny)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str,
        deadline_ms: int,
        cipher: FieldCipher,
        max_credentials: int = 10,
        on_corrupt: Callable[[], None] | None = None,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain '{' or '}'")
        self._client = client
        self._prefix = prefix
        self._deadline_s = deadline_ms / 1000
        self._cipher = cipher
        self.max_credentials = max_credentials
        self._on_corrupt = on_corrupt

    def _corrupt(self) -> None:
        if self._on_corrupt is not None:
            self._on_corrupt()

    def registry_key(self, user: str) -> str:
        return UserKeys(self._prefix, user).base + "pk"

    def transaction_key(self, user: str, session: str, digest: str) -> str:
        """Where the Check finds (and GETDELs) the grant for one request."""
        if not digest.isalnum() or not session.isalnum():
            raise ValueError("session and digest are hex")
        return f"{UserKeys(self._prefix, user).base}tx:{session}:{digest}"

    def state_key(self, state_id: str) -> str:
        return f"{self._prefix}pk:st:{hashlib.sha256(state_id.encode()).hexdigest()}"

    async def _call(self, what: str, awaitable: Any) -> Any:
        try:
            async with asyncio.timeout(self._deadline_s):
                return await awaitable
        except _CLIENT_ERRORS as exc:
            raise StoreError(f"{what} failed: {type(exc).__name__}") from exc

    async def _eval(
        self, what: str, script: Script, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        async def run() -> Any:
            try:
                return await self._client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:  # a restarted or flushed server: send the text once
                return await self._client.eval(script.text, len(keys), *keys, *args)

        return await self._call(what, run())

    # -- sealing ----------------------------------------------------------------------------

    def _seal(self, key: str, cred: Credential) -> str:
        body = json.dumps(cred.to_json(), separators=(",", ":"), sort_keys=True)
        return self._cipher.encrypt(body, f"{key}#{cred.handle}")

    def _open(self, key: str, handle: str, raw: bytes | str) -> Credential | None:
        plain = self._cipher.decrypt(raw, f"{key}#{handle}")
        if plain is None:
            self._corrupt()
            return None
        try:
            cred = Credential.from_json(json.loads(plain))
        except (ValueError, UnicodeDecodeError):
            self._corrupt()
            return None
        if cred.handle != handle:  # a record filed under another credential's name
            self._corrupt()
            return None
        return cred

    # -- the registry -----------------------------------------------------------------------

    async def add(self, user: str, cred: Credential, *, replace_existing: bool = False) -> int:
        """1 stored; -1 the credential is already registered; -2 the registry is full."""
        key = self.registry_key(user)
        args = (
            cred.handle,
            self._seal(key, cred),
            self.max_credentials,
            "1" if replace_existing else "0",
        )
        return int(await self._eval("credential add", _ADD, [key], args))

    async def get(self, user: str, credential_id: bytes) -> tuple[Credential, bytes] | None:
        """The credential and the sealed value it was read from (for ``advance``)."""
        key, handle = self.registry_key(user), handle_of(credential_id)
        raw = await self._call("credential read", self._client.hget(key, handle))
        if raw is None:
            return None
        cred = self._open(key, handle, raw)
        if cred is None or cred.credential_id != credential_id:
            return None
        return cred, raw

    async def credentials(self, user: str) -> list[Credential]:
        key = self.registry_key(user)
        raw: dict[bytes, bytes] = await self._call("credential list", self._client.hgetall(key))
        out = [c for h, v in raw.items() if (c := self._open(key, h.decode(), v)) is not None]
        out.sort(key=lambda c: (c.created_at, c.handle))
        return out

    async def count(self, user: str) -> int:
        return int(await self._call("credential count", self._client.hlen(self.registry_key(user))))

    async def advance(self, user: str, read: bytes, updated: Credential) -> bool:
        """Write ``updated`` only if the record is still the one read (compare-and-set)."""
        key = self.registry_key(user)
        done = await self._eval(
            "credential update", _CAS, [key], (updated.handle, read, self._seal(key, updated))
        )
        return bool(done)

    async def remove(self, user: str, credential_id: bytes) -> Credential | None:
        key, handle = self.registry_key(user), handle_of(credential_id)
        raw = await self._eval("credential remove", _TAKE, [key], (handle,))
        if raw is None or raw is False:
            return None
        return self._open(key, handle, raw)

    async def scan(self) -> AsyncIterator[tuple[str, Credential]]:
        """Every (user key, credential) in the store: export, reseal, operator listing."""
        pattern = f"{self._prefix}u:{{*}}:pk"
        try:
            keys = [k async for k in self._client.scan_iter(match=pattern, count=500)]
        except _CLIENT_ERRORS as exc:
            raise StoreError(f"credential scan failed: {type(exc).__name__}") from exc
        for raw_key in sorted(keys):
            key = raw_key.decode()
            user = key[key.index("{") + 1 : key.index("}")]
            for cred in await self.credentials(user):
                yield user, cred

    async def reseal(self) -> int:
        """Rewrite every record under the active key (before retiring an old kid)."""
        n = 0
        async for user, cred in self.scan():
            got = await self.get(user, cred.credential_id)
            if got is not None and await self.advance(user, got[1], got[0]):
                n += 1
        return n

    # -- transaction grants -----------------------------------------------------------------

    async def put_transaction_grant(
        self, user: str, session: str, tx: TransactionGrant, now: int
    ) -> None:
        ttl = tx.grant.expires_at - now
        if ttl < 1:
            raise ValueError("refusing to store a grant that has already expired")
        key = self.transaction_key(user, session, tx.digest)
        value = self._cipher.encrypt(tx.to_json(), key)
        await self._call("transaction grant write", self._client.set(key, value, ex=ttl))

    async def consume_transaction_grant(
        self, user: str, session: str, level: str, digest: str, now: int
    ) -> TransactionGrant | None:
        """The grant for exactly this request, removed as it is read (GETDEL: once, even
        across replicas); None when there is none, it is for another level or expired."""
        key = self.transaction_key(user, session, digest)
        raw = await self._call("transaction grant take", self._client.getdel(key))
        if raw is None:
            return None
        plain = self._cipher.decrypt(raw, key)
        tx = None if plain is None else decode_transaction_grant(plain, level, digest)
        if tx is None:
            self._corrupt()
            return None
        return tx if tx.grant.is_live(now) else None

    # -- ceremony state ---------------------------------------------------------------------

    async def put_state(self, state_id: str, payload: Mapping[str, Any], ttl_s: int) -> None:
        key = self.state_key(state_id)
        value = self._cipher.encrypt(json.dumps(dict(payload), separators=(",", ":")), key)
        if not await self._call(
            "ceremony state write", self._client.set(key, value, ex=ttl_s, nx=True)
        ):
            raise StoreError("ceremony state id already in use")

    async def take_state(self, state_id: str) -> dict[str, Any] | None:
        key = self.state_key(state_id)
        raw = await self._call("ceremony state take", self._client.getdel(key))
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

    # -- what enrolment reads of the session -----------------------------------------------

    async def session_grants(self, user: str, session: str, levels: Sequence[str]) -> list[Grant]:
        """The session's grants at ``levels`` (the enrolment rule's "fresh step-up")."""
        if not levels:
            return []
        keys = UserKeys(self._prefix, user)
        names = [keys.grant(session, lv) for lv in levels]
        values = await self._call("grant read", self._client.mget(names))
        out: list[Grant] = []
        for lv, name, raw in zip(levels, names, values, strict=True):
            if raw is None:
                continue
            plain = self._cipher.decrypt(raw, name)
            grant = None if plain is None else decode_grant(plain, lv)
            if grant is None:
                self._corrupt()
            else:
                out.append(grant)
        return out

    # -- durability -------------------------------------------------------------------------

    async def durability(self) -> Durability:
        """Whether this Redis persists and keeps keys without a TTL (start-up check)."""
        try:
            async with asyncio.timeout(max(self._deadline_s, 2.0)):
                persistence = await self._client.info("persistence")
                memory = await self._client.info("memory")
                try:
                    save = await self._client.config_get("save")
                    schedule: bool | None = bool(str(save.get("save", "")).strip())
                except RedisError:  # CONFIG disabled (managed Redis): unknown, not "none"
                    schedule = None
        except _CLIENT_ERRORS as exc:
            raise StoreError(f"durability check failed: {type(exc).__name__}") from exc
        persistence = dict(persistence)
        if schedule is not None:
            persistence["stepup_rdb_schedule"] = schedule
        return assess_durability(persistence, memory)


def decode_transaction_grant(raw: bytes | str, level: str, digest: str) -> TransactionGrant | None:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("v") != RECORD_VERSION:
        return None
    if doc.get("level") != level or doc.get("digest") != digest:
        return None
    amr, acr, auth_time = doc.get("amr"), doc.get("acr"), doc.get("auth_time")
    exp, iat, device, ip = doc.get("exp"), doc.get("iat"), doc.get("device"), doc.get("ip")
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (exp, iat, auth_time))
    if (
        not ints
        or not (acr is None or isinstance(acr, str))
        or not (isinstance(amr, list) and all(isinstance(a, str) for a in amr))
        or not all(x is None or isinstance(x, str) for x in (device, ip))
    ):
        return None
    assert isinstance(exp, int) and isinstance(iat, int) and isinstance(auth_time, int)
    grant = Grant(
        level=level,
        evidence=Evidence(acr=acr, amr=tuple(amr), auth_time=auth_time),
        expires_at=exp,
        issued_at=iat,
        device=device,
        ip=ip,
    )
    return TransactionGrant(grant, digest)


def with_use(cred: Credential, *, sign_count: int, backup_state: bool, now: int) -> Credential:
    return replace(cred, sign_count=sign_count, backup_state=backup_state, last_used_at=now)
