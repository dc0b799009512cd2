"""RFC 7662 token introspection for access tokens the service cannot verify itself.

Many IdPs issue opaque (reference) access tokens by default; the service then asks the
IdP's introspection endpoint whether the token is active and what it proves. The answer's
``acr``, ``amr``, ``auth_time`` and ``sid`` are read exactly like a JWT's (the same
``TokenVerifier.identity_from_claims``), so both kinds of token give the same Identity.

Fail closed, and cheap for the IdP:
* client authentication (``client_secret_basic`` or ``_post``, RFC 6749 section 2.3.1);
* a deadline (``timeout_ms``) on every call; an error, a non-200 answer, a malformed or
  oversized body, or a late answer is ``IntrospectionUnavailable`` (a deny), never an allow;
* an active answer is cached until the earlier of its ``exp`` and ``cache_ttl_s``; an
  inactive one for ``negative_cache_ttl_s``; the cache is bounded (LRU, ``cache_size``);
* concurrent checks of one token share one call; beyond ``max_inflight`` calls the check
  fails closed at once rather than queueing (junk tokens cannot pile up on the IdP);
* the answer must name our audience (or, with ``require_audience`` off, an allowed
  client), be a Bearer token (a refresh token introspects as active too) and carry no
  ``cnf`` (a sender-constrained token's proof is not checked here).

Entry point: :func:`build_access_tokens` gives the object the authorizer and the step-up
endpoints take as their token verifier.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from authz.check.jwks import get_json
from authz.check.tokens import (
    MAX_TOKEN_BYTES,
    CacheStats,
    IdToken,
    TokenVerifier,
    json_object,
    token_session_id,
)
from authz.config.settings import IntrospectionSettings, OidcSettings
from authz.core.reasons import Reason
from authz.core.session import Identity
from authz.errors import IntrospectionUnavailable, TokenError

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 64 * 1024
# RFC 6750 section 2.1 b64token: what a bearer token may be made of.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def _invalid(msg: str) -> TokenError:
    return TokenError(msg, reason=Reason.TOKEN_INVALID)


@dataclass(frozen=True, slots=True)
class _Entry:
    identity: Identity | None  # None: the IdP said "not active"
    until: int  # epoch seconds; the entry is used while now < until


class Introspector:
    """Asks one introspection endpoint about opaque access tokens (RFC 7662 section 2)."""

    def __init__(
        self,
        settings: OidcSettings,
        verifier: TokenVerifier,
        session: aiohttp.ClientSession,
        *,
        endpoint: str,
    ) -> None:
        conf = settings.introspection
        if conf is None:
            raise ValueError("oidc.introspection is not configured")
        self._oidc = settings
        self._conf: IntrospectionSettings = conf
        self._verifier = verifier
        self._session = session
        self.endpoint = endpoint
        self._timeout_s = conf.timeout_ms / 1000
        client_id = conf.client_id or settings.client_id
        secret = conf.secret() if conf.client_id is not None else settings.secret()
        if secret is None:
            raise ValueError("introspection needs a client secret (RFC 7662 section 2.1)")
        self._form_auth: dict[str, str] = {}
        self._headers = {"Accept": "application/json"}
        if conf.auth_method == "client_secret_basic":
            pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            self._form_auth = {"client_id": client_id, "client_secret": secret}
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[_Entry]] = {}
        self.cache_stats = CacheStats()
        self.calls = 0  # requests sent to the IdP (metrics, tests)

    @property
    def introspects_jwts(self) -> bool:
        return self._conf.jwt_tokens

    async def verify_access_token(self, token: str, now: int) -> Identity:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
            raise _invalid("token too large or not a string")
        if not _B64TOKEN.fullmatch(token):
            raise _invalid("not a bearer token (RFC 6750 b64token)")
        digest = hashlib.sha256(token.encode()).digest()
        entry = self._cache.get(digest)
        if entry is not None and now < entry.until:
            self._cache.move_to_end(digest)
            self.cache_stats.hits += 1
        else:
            if entry is not None:
                del self._cache[digest]
            self.cache_stats.misses += 1
            entry = await self._shared_call(digest, token, now)
        if entry.identity is None:
            raise _invalid("token not active (introspection)")
        if now >= entry.identity.expires_at + self._oidc.leeway_s:
            raise TokenError("token expired", reason=Reason.TOKEN_EXPIRED)
        return entry.identity

    async def _shared_call(self, digest: bytes, token: str, now: int) -> _Entry:
        task = self._inflight.get(digest)
        if task is None:
            if len(self._inflight) >= self._conf.max_inflight:
                raise IntrospectionUnavailable("too many introspection calls in flight")
            task = asyncio.create_task(self._call(token, now))
            self._inflight[digest] = task
            task.add_done_callback(lambda t: self._done(digest, t))
        # shield: one caller cancelled (Envoy gave up) does not cancel the others' answer
        return await asyncio.shield(task)

    def _done(self, digest: bytes, task: asyncio.Task[_Entry]) -> None:
        if self._inflight.get(digest) is task:
            del self._inflight[digest]
        if task.cancelled() or task.exception() is not None:
            return
        if self._conf.cache_size:
            self._cache[digest] = task.result()
            self._cache.move_to_end(digest)
            while len(self._cache) > self._conf.cache_size:
                self._cache.popitem(last=False)

    async def _call(self, token: str, now: int) -> _Entry:
        self.calls += 1
        data = {"token": token, "token_type_hint": "access_token", **self._form_auth}
        try:
            async with asyncio.timeout(self._timeout_s):
                body = await self._post(data)
        except TimeoutError:
            raise IntrospectionUnavailable("introspection timed out") from None
        except aiohttp.ClientError as exc:
            raise IntrospectionUnavailable(f"introspection failed: {type(exc).__name__}") from None
        return self._entry(body, now, token_session_id(token))

    async def _post(self, data: dict[str, str]) -> bytes:
        async with self._session.post(
            self.endpoint, data=data, headers=self._headers, allow_redirects=False
        ) as resp:
            if resp.status != 200:
                # 401: our credentials are refused; 400: the IdP will not introspect it
                log.warning("introspection: HTTP %d from %s", resp.status, self.endpoint)
                raise IntrospectionUnavailable(f"introspection returned HTTP {resp.status}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(16 * 1024):
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise IntrospectionUnavailable("introspection response too large")
        return bytes(body)

    def _entry(self, body: bytes, now: int, token_sid: str) -> _Entry:
        try:
            doc = json_object(body, "introspection response")
        except TokenError:
            raise IntrospectionUnavailable("introspection response is not a JSON object") from None
        active = doc.get("active")
        if active is not True:
            if active is not False:  # RFC 7662 section 2.2: REQUIRED boolean
                raise IntrospectionUnavailable("introspection response has no boolean `active`")
            return _Entry(None, now + self._conf.negative_cache_ttl_s)
        identity = self._identity(doc, now, token_sid)
        until = min(identity.expires_at, now + self._conf.cache_ttl_s)
        return _Entry(identity, until)

    def _identity(self, doc: dict[str, Any], now: int, token_sid: str) -> Identity:
        """RFC 7662 section 2.2 members checked as a JWT's claims would be (fail closed)."""
        o = self._oidc
        iss = doc.setdefault("iss", o.issuer)  # we asked the issuer's own endpoint
        if iss != o.issuer:
            raise _invalid("`iss` mismatch (introspection)")
        aud = doc.get("aud")
        auds = [aud] if isinstance(aud, str) else aud
        if auds is not None and (
            not isinstance(auds, list) or not all(isinstance(a, str) for a in auds)
        ):
            raise _invalid("`aud` is not a string or a list of strings")
        if auds is None and self._conf.require_audience:
            raise _invalid("no `aud` in the introspection response")
        if auds is not None and o.audience not in auds:
            raise _invalid("`aud` mismatch (introspection)")
        if self._conf.require_token_type:
            kind = doc.get("token_type")
            if not isinstance(kind, str) or kind.lower() != "bearer":
                raise _invalid("not a Bearer access token (introspection `token_type`)")
        if "cnf" in doc:
            raise _invalid("sender-constrained token (`cnf`): its proof is not checked here")
        exp = doc.get("exp")
        if type(exp) is not int:
            raise _invalid("`exp` missing or not an integer (introspection)")
        if now >= exp + o.leeway_s:
            raise TokenError("token expired", reason=Reason.TOKEN_EXPIRED)
        nbf = doc.get("nbf")
        if nbf is not None and (type(nbf) is not int or now < nbf - o.leeway_s):
            raise _invalid("token not yet valid (`nbf`)")
        iat = doc.get("iat", 0)  # absent: issued "at 0", so a user revocation covers it
        if type(iat) is not int or iat > now + o.leeway_s:
            raise _invalid("`iat` not an integer or in the future")
        return self._verifier.identity_from_claims(
            doc, expires_at=exp, issued_at=iat, token_sid=token_sid
        )


class AccessTokens:
    """The token verifier the Check and the step-up endpoints use: compact JWS tokens go
    to the JWT verifier (unless ``jwt_tokens`` sends them to introspection too), every
    other token to the introspection endpoint. Without introspection it is the JWT
    verifier alone."""

    def __init__(
        self, jwt: TokenVerifier, introspector: Introspector | None, *, pending: bool = False
    ) -> None:
        """``pending``: introspection is configured but its endpoint comes from the IdP's
        discovery document, not in yet (the service started degraded): until
        :meth:`set_introspector`, a token that needs introspection is refused as the IdP
        being unavailable (fail closed, retried by the client), never read as a JWT."""
        self.jwt = jwt
        self.introspector = introspector
        self._pending = pending and introspector is None
        self._introspect_jwts = introspector is not None and introspector.introspects_jwts

    @property
    def pending(self) -> bool:
        return self._pending

    def set_introspector(self, introspector: Introspector) -> None:
        self.introspector = introspector
        self._introspect_jwts = introspector.introspects_jwts
        self._pending = False

    @property
    def cache_stats(self) -> CacheStats:
        return self.jwt.cache_stats

    async def verify_access_token(self, token: str, now: int) -> Identity:
        if self.introspector is None:
            if self._pending and not (isinstance(token, str) and _COMPACT_JWS.fullmatch(token)):
                raise IntrospectionUnavailable("the IdP's introspection endpoint is not known yet")
            return await self.jwt.verify_access_token(token, now)
        if isinstance(token, str) and _COMPACT_JWS.fullmatch(token):
            identity = await self.jwt.verify_access_token(token, now)
            if self._introspect_jwts:  # signature fine; the IdP says whether still active
                return await self.introspector.verify_access_token(token, now)
            return identity
        return await self.introspector.verify_access_token(token, now)

    async def verify_id_token(self, token: str, now: int, *, nonce: str) -> IdToken:
        return await self.jwt.verify_id_token(token, now, nonce=nonce)


def introspector_for(
    settings: OidcSettings, jwt: TokenVerifier, session: aiohttp.ClientSession, endpoint: str
) -> Introspector:
    """An :class:`Introspector` at ``endpoint`` (the configured one, or the discovery
    document's): https, or the issuer's own scheme (development); ValueError otherwise."""
    if not _acceptable_url(endpoint, settings.issuer):
        raise ValueError("introspection.endpoint must be https (or the issuer's scheme)")
    return Introspector(settings, jwt, session, endpoint=endpoint)


async def discover_introspection_endpoint(
    issuer: str, session: aiohttp.ClientSession, timeout_s: float
) -> str:
    """``introspection_endpoint`` from the issuer's discovery document (RFC 8414 section 2,
    OpenID Discovery 4.3: the document's issuer must be ours). https, or the issuer's own
    scheme (development). Raises IntrospectionUnavailable."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        doc = await get_json(session, url, timeout_s)
    except Exception as exc:  # network, status, size, JSON: all mean "cannot introspect"
        raise IntrospectionUnavailable(f"discovery {url} failed: {type(exc).__name__}") from exc
    if not isinstance(doc, dict) or doc.get("issuer") != issuer:
        raise IntrospectionUnavailable(f"discovery {url}: `issuer` does not equal {issuer!r}")
    endpoint = doc.get("introspection_endpoint")
    if not isinstance(endpoint, str) or not _acceptable_url(endpoint, issuer):
        raise IntrospectionUnavailable(f"discovery {url}: no usable `introspection_endpoint`")
    return endpoint


def _acceptable_url(url: str, issuer: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in {"https", urlsplit(issuer).scheme} and bool(parts.netloc)


async def build_access_tokens(
    settings: OidcSettings, jwt: TokenVerifier, session: aiohttp.ClientSession
) -> AccessTokens:
    """The service's access-token verifier for these settings (discovery when
    ``introspection.endpoint`` is unset). The wiring: ``app.py`` passes the result as
    ``tokens`` to ``Authorizer`` and ``StepupApp``."""
    conf = settings.introspection
    if conf is None:
        return AccessTokens(jwt, None)
    endpoint = conf.endpoint
    if endpoint is None:
        endpoint = await discover_introspection_endpoint(
            settings.issuer, session, settings.http_timeout_s
        )
    elif not _acceptable_url(endpoint, settings.issuer):
        raise ValueError("introspection.endpoint must be https (or the issuer's scheme)")
    return AccessTokens(jwt, Introspector(settings, jwt, session, endpoint=endpoint))


__all__ = [
    "AccessTokens",
    "Introspector",
    "build_access_tokens",
    "discover_introspection_endpoint",
    "introspector_for",
]
