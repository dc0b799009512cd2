"""Verification key sources: a JWKS from a dict, a file or a URL, fetched without blocking.

pyjwt's ``PyJWKClient`` fetches with blocking ``urllib``; here the JWKS is fetched with
aiohttp and only the parsed keys are handed to pyjwt. Each source holds an immutable
:class:`KeySet` and swaps in a new one atomically, so a failed refresh keeps the old keys.

Key selection is strict (RFC 7517, RFC 8725 section 3.1): a key is used for ``alg`` only if
its ``kty`` (and ``crv``) fit that algorithm, its own ``alg`` (if any) equals it, ``use`` (if
any) is ``sig`` and ``key_ops`` (if any) allow ``verify``. Symmetric (``oct``) keys and keys
carrying private material are never loaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import aiohttp
import jwt

from authz.config.settings import OidcSettings
from authz.errors import KeysUnavailable

log = logging.getLogger(__name__)

MAX_KID_LEN = 256
MAX_DOCUMENT_BYTES = 512 * 1024  # a JWKS or discovery document larger than this is refused
MAX_KEYS = 100
DEFAULT_PERIODIC_REFRESH_S = 600.0

# algorithm -> (kty, allowed crv values or None when the kty has no curve)
_ALG_KEY_TYPES: dict[str, tuple[str, frozenset[str] | None]] = {
    **{a: ("RSA", None) for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
# the algorithm used to prove a JWK without its own `alg` parses at load time
_DEFAULT_ALG = {
    "RSA": "RS256",
    "EC:P-256": "ES256",
    "EC:P-384": "ES384",
    "EC:P-521": "ES512",
    "OKP:Ed25519": "EdDSA",
    "OKP:Ed448": "EdDSA",
}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def key_fits(jwk: Mapping[str, Any], alg: str) -> bool:
    """Whether a JWK may verify signatures made with ``alg`` (its kty/crv/alg/use/key_ops)."""
    want = _ALG_KEY_TYPES.get(alg)
    if want is None:
        return False
    kty, curves = want
    if jwk.get("kty") != kty or (curves is not None and jwk.get("crv") not in curves):
        return False
    if "alg" in jwk and jwk["alg"] != alg:
        return False
    if "use" in jwk and jwk["use"] != "sig":
        return False
    ops = jwk.get("key_ops")
    return ops is None or (isinstance(ops, list) and "verify" in ops)


class KeySet:
    """An immutable set of public verification keys parsed from one JWKS document."""

    __slots__ = ("_built", "_jwks", "fingerprint", "kids")

    def __init__(self, jwks: Any) -> None:
        """Parse ``jwks``; unusable keys are skipped (logged), ValueError if none is usable."""
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise ValueError("not a JWKS document (no `keys` list)")
        if len(jwks["keys"]) > MAX_KEYS:
            raise ValueError(f"JWKS has more than {MAX_KEYS} keys")
        usable: list[dict[str, Any]] = []
        self._built: dict[tuple[str | None, str], jwt.PyJWK] = {}
        for raw in jwks["keys"]:
            why = self._load_one(raw)
            if why:
                kid = raw.get("kid") if isinstance(raw, dict) else None
                log.warning("jwks: skipping key kid=%.64r: %s", kid, why)
            else:
                usable.append(raw)
        if not usable:
            raise ValueError("JWKS has no usable verification key")
        self._jwks = tuple(usable)
        self.kids = frozenset(k["kid"] for k in usable if isinstance(k.get("kid"), str))
        self.fingerprint = tuple(sorted(json.dumps(k, sort_keys=True) for k in usable))

    def _load_one(self, raw: Any) -> str:
        if not isinstance(raw, dict):
            return "not an object"
        kid = raw.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_LEN):
            return "bad kid"
        if raw.get("kty") == "oct" or _PRIVATE_MEMBERS & raw.keys():
            return "symmetric or private key material"
        alg = raw.get("alg")
        if alg is None:
            kty = raw.get("kty")
            alg = _DEFAULT_ALG.get("RSA" if kty == "RSA" else f"{kty}:{raw.get('crv')}")
        if not isinstance(alg, str) or not key_fits(raw, alg):
            return "unsupported kty/crv/alg/use"
        try:
            key = jwt.PyJWK(raw, algorithm=alg)
        except jwt.PyJWTError as exc:
            return f"unparsable ({type(exc).__name__})"
        if kid is not None:  # without a kid, get() must first check the key is the only fit
            self._built.setdefault((kid, alg), key)
        return ""

    def __len__(self) -> int:
        return len(self._jwks)

    def get(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        """The key for (kid, alg); without a kid, the only key that fits ``alg`` (if one)."""
        memo = (kid, alg)
        if memo in self._built:
            return self._built[memo]
        fits = [k for k in self._jwks if key_fits(k, alg)]
        if kid is not None:
            fits = [k for k in fits if k.get("kid") == kid]
        key: jwt.PyJWK | None = None
        if len(fits) == 1 or (fits and kid is not None):
            try:
                key = jwt.PyJWK(fits[0], algorithm=alg)
            except jwt.PyJWTError:
                key = None
        if key is not None:  # only real (kid, alg) pairs: unknown kids come from attackers
            self._built[memo] = key
        return key


@runtime_checkable
class KeySource(Protocol):
    """Where the verifier finds public keys. Implementations never block the event loop."""

    def get(self, kid: str | None, alg: str) -> jwt.PyJWK | None: ...

    async def refresh(self) -> bool: ...

    def retry_after(self, kid: str | None = None) -> float | None:
        """Seconds until ``refresh()`` would fetch again, when the rate limit holds it back
        now (and no fetch is in flight); None when a refresh can run or would not help
        (``kid`` was withdrawn by the last reload: no refetch brings it back)."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    @property
    def ready(self) -> bool: ...


class StaticKeySource:
    """A fixed JWKS given as a dict (tests, ``policy explain``). ``refresh`` never changes it."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        try:
            self._keys: KeySet | None = KeySet(dict(jwks))
        except ValueError as exc:
            log.warning("jwks: static key set refused: %s", exc)
            self._keys = None

    def get(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        return None if self._keys is None else self._keys.get(kid, alg)

    async def refresh(self) -> bool:
        return False

    def retry_after(self, kid: str | None = None) -> float | None:
        return None  # a fixed set: waiting never brings a new key

    async def start(self) -> None:
        if self._keys is None:
            raise KeysUnavailable("static JWKS has no usable verification key")

    async def aclose(self) -> None:
        return None

    @property
    def ready(self) -> bool:
        return self._keys is not None


class _ReloadingKeySource:
    """Shared machinery: single-flight, rate-limited reloads; old keys kept on failure."""

    def __init__(
        self,
        *,
        min_interval_s: float,
        refresh_every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys: KeySet | None = None
        self._min_interval_s = min_interval_s
        self._refresh_every_s = refresh_every_s
        self._clock = clock
        self._last_attempt: float | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._periodic: asyncio.Task[None] | None = None
        self._deferred: asyncio.Task[None] | None = None
        self._withdrawn: frozenset[str] = frozenset()  # kids the last reload removed
        self.fetches = 0  # load attempts, for metrics and tests

    async def _load(self) -> Any:
        """Fetch and JSON-decode the JWKS document (subclasses)."""
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    def get(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        keys = self._keys
        return None if keys is None else keys.get(kid, alg)

    @property
    def ready(self) -> bool:
        return self._keys is not None

    async def start(self) -> None:
        """Load the keys once (not rate limited); KeysUnavailable if that fails."""
        self._last_attempt = self._clock()
        try:
            self._install(await self._fetch())
        except Exception as exc:  # any failure to load is the same fail-closed outcome
            raise KeysUnavailable(f"cannot load keys from {self._describe()}: {_why(exc)}") from exc
        if self._refresh_every_s and self._periodic is None:
            self._periodic = asyncio.create_task(self._every(self._refresh_every_s))

    async def refresh(self) -> bool:
        """Reload at most once per ``min_interval_s``; True if the key set changed.

        Concurrent callers share one fetch; a caller being cancelled does not cancel it.
        A failed reload keeps the old keys and also counts against the interval, so an
        attacker sending unknown kids cannot make us hammer a struggling IdP.
        """
        held = self.retry_after()
        if held is not None:
            self._defer(held)
            return False
        return await self._reload_now()

    def retry_after(self, kid: str | None = None) -> float | None:
        if self._inflight is not None or self._last_attempt is None:
            return None
        if kid is not None and kid in self._withdrawn:
            return None
        left = self._min_interval_s - (self._clock() - self._last_attempt)
        return left if left > 0 else None

    def _defer(self, delay: float) -> None:
        """One reload at the end of the held-back interval: a key published by a second
        rotation inside the interval is loaded then, without waiting for another token to
        ask. At most one is pending, so unknown kids cannot add fetches."""
        if self._deferred is not None and not self._deferred.done():
            return

        async def later() -> None:
            await asyncio.sleep(delay)
            if self.retry_after() is None:
                await self._reload_now()

        self._deferred = asyncio.create_task(later())

    async def _reload_now(self) -> bool:
        if self._inflight is None:
            self._last_attempt = self._clock()
            self._inflight = asyncio.create_task(self._reload())
            self._inflight.add_done_callback(self._clear_inflight)
        return await asyncio.shield(self._inflight)

    def _clear_inflight(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _reload(self) -> bool:
        try:
            return self._install(await self._fetch())
        except Exception as exc:  # keep serving with the old keys whatever went wrong
            log.warning(
                "jwks: refresh from %s failed, keeping the old keys: %s",
                self._describe(),
                _why(exc),
            )
            return False

    async def _fetch(self) -> KeySet:
        self.fetches += 1
        return KeySet(await self._load())

    def _install(self, keys: KeySet) -> bool:
        old = self._keys
        if old is not None and old.fingerprint == keys.fingerprint:
            return False  # keep the old object: verified-token cache entries stay valid
        if old is not None:
            self._withdrawn = old.kids - keys.kids
        self._keys = keys
        log.info("jwks: loaded %d key(s) from %s", len(keys), self._describe())
        return True

    async def _every(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            await self._reload_now()

    async def aclose(self) -> None:
        tasks = [t for t in (self._periodic, self._inflight, self._deferred) if t is not None]
        self._periodic = self._inflight = self._deferred = None
        for task in tasks:
            task.cancel()
        # gather (not try/except) so that cancelling aclose() itself still propagates
        await asyncio.gather(*tasks, return_exceptions=True)


class FileKeySource(_ReloadingKeySource):
    """A JWKS JSON file, read at ``start()`` and re-read on ``refresh()``."""

    def __init__(
        self,
        path: Path | str,
        *,
        min_interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(min_interval_s=min_interval_s, clock=clock)
        self._path = Path(path)

    def _describe(self) -> str:
        return str(self._path)

    async def _load(self) -> Any:
        text = await asyncio.to_thread(self._path.read_bytes)
        if len(text) > MAX_DOCUMENT_BYTES:
            raise ValueError("JWKS file too large")
        return _json(text)


class JwksKeySource(_ReloadingKeySource):
    """A JWKS URL fetched with aiohttp; or, with ``issuer`` instead of ``url``, the
    ``jwks_uri`` from the issuer's discovery document, looked up at the first load."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        url: str | None = None,
        issuer: str | None = None,
        timeout_s: float = 2.0,
        min_interval_s: float = 30.0,
        refresh_every_s: float | None = DEFAULT_PERIODIC_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (url is None) == (issuer is None):
            raise ValueError("give exactly one of url and issuer")
        super().__init__(
            min_interval_s=min_interval_s, refresh_every_s=refresh_every_s, clock=clock
        )
        self._session = session
        self._url = url
        self._issuer = issuer
        self._timeout_s = timeout_s

    @property
    def url(self) -> str | None:
        return self._url

    def _describe(self) -> str:
        return self._url or f"discovery for {self._issuer}"

    async def _load(self) -> Any:
        if self._url is None:
            assert self._issuer is not None
            self._url = await discover_jwks_url(self._issuer, self._session, self._timeout_s)
        return await get_json(self._session, self._url, self._timeout_s)


async def get_json(session: aiohttp.ClientSession, url: str, timeout_s: float) -> Any:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.get(
        url, timeout=timeout, max_redirects=3, headers={"Accept": "application/json"}
    ) as resp:
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > MAX_DOCUMENT_BYTES:
                raise ValueError("document too large")
    return _json(bytes(body))


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise ValueError(f"invalid JSON: {exc}") from exc


async def discover_jwks_url(issuer: str, session: aiohttp.ClientSession, timeout_s: float) -> str:
    """The ``jwks_uri`` from ``{issuer}/.well-known/openid-configuration``.

    OpenID Connect Discovery 1.0 section 4.3: the document's ``issuer`` must be identical to
    the issuer it was fetched for. The ``jwks_uri`` must be https, or http when the issuer
    itself is http (development). Raises KeysUnavailable.
    """
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"  # Discovery section 4
    try:
        doc = await get_json(session, url, timeout_s)
    except Exception as exc:  # network, HTTP status, size, JSON: all mean "no keys"
        raise KeysUnavailable(f"discovery {url} failed: {_why(exc)}") from exc
    if not isinstance(doc, dict) or doc.get("issuer") != issuer:
        raise KeysUnavailable(f"discovery {url}: `issuer` does not equal {issuer!r}")
    jwks_uri = doc.get("jwks_uri")
    allowed = {"https", urlsplit(issuer).scheme}
    if (
        not isinstance(jwks_uri, str)
        or urlsplit(jwks_uri).scheme not in allowed
        or not urlsplit(jwks_uri).netloc
    ):
        raise KeysUnavailable(f"discovery {url}: missing or unacceptable `jwks_uri`")
    return jwks_uri


def key_source_from_settings(settings: OidcSettings, session: aiohttp.ClientSession) -> KeySource:
    """``jwks_file`` > ``jwks_url`` > discovery from ``issuer`` (done lazily in ``start()``)."""
    if settings.jwks_file is not None:
        return FileKeySource(
            settings.jwks_file, min_interval_s=settings.jwks_refresh_min_interval_s
        )
    return JwksKeySource(
        session,
        url=settings.jwks_url,
        issuer=None if settings.jwks_url is not None else settings.issuer,
        timeout_s=settings.jwks_timeout_s,
        min_interval_s=settings.jwks_refresh_min_interval_s,
    )
