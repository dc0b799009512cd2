"""JWT verification for access tokens and ID tokens (pyjwt for signatures, our own clock).

Fail closed: every failure raises :class:`TokenError` (reason ``token-invalid`` or
``token-expired``) or :class:`KeysUnavailable`. Messages name the failing check, never the
token. The rules follow RFC 7519 (claims), RFC 8725 (JWT BCP), RFC 9068 (access-token
``typ``) and OpenID Connect Core 1.0 section 3.1.3.7 (ID tokens).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import jwt
from jwt.utils import base64url_decode

from authz.check.jwks import (
    MAX_KID_LEN,
    FileKeySource,
    JwksKeySource,
    KeySource,
    StaticKeySource,
    discover_jwks_url,
    key_source_from_settings,
)
from authz.config.settings import OidcSettings
from authz.core.reasons import Reason
from authz.core.session import Evidence, Identity
from authz.errors import KeysUnavailable, TokenError
from authz.stepup.profiles import PROFILES, ClaimError, IdpProfile, client_of, read_evidence
from authz.stepup.profiles import resolve as resolve_profile

__all__ = [
    "AUTH_REQ_ID_CLAIM",
    "MAX_TOKEN_BYTES",
    "AccessTokenVerifier",
    "CacheObserver",
    "CacheStats",
    "FileKeySource",
    "IdToken",
    "IdTokenVerifier",
    "JwksKeySource",
    "KeySource",
    "StaticKeySource",
    "StepupTokens",
    "TokenVerifier",
    "accepted_typs",
    "discover_jwks_url",
    "evidence_from_claims",
    "json_object",
    "key_source_from_settings",
]

MAX_TOKEN_BYTES = 8 * 1024
# OpenID CIBA Core 1.0: the claim binding an ID token to its backchannel request.
AUTH_REQ_ID_CLAIM = "urn:openid:params:jwt:claim:auth_req_id"
# Compact JWS only (three base64url parts); JWE (five parts) and JSON serialisation refused.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_NEVER = frozenset({"none", "HS256", "HS384", "HS512"})
_KID = re.compile(r"[A-Za-z0-9_.:~+=-]{1,256}")
# `sub` and `acr` travel on as upstream headers (x-stepup-user, x-stepup-acr): a control
# character there would split a header line. Such a token is refused with a reason here,
# not left to the proxy's codec.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _invalid(msg: str) -> TokenError:
    return TokenError(msg, reason=Reason.TOKEN_INVALID)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-JSON number {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate member")  # RFC 7519 section 4: reject, do not pick one
    return out


def _loads(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise _invalid(f"malformed {what}") from None
    if not isinstance(doc, dict):
        raise _invalid(f"{what} is not a JSON object")
    return doc


def json_object(raw: bytes, what: str) -> dict[str, Any]:
    """A JSON object parsed strictly (duplicate members and NaN refused): token-invalid."""
    return _loads(raw, what)


def _int_claim(claims: dict[str, Any], name: str, *, required: bool) -> int | None:
    """A NumericDate as an integer; bool, float and str are refused (fail closed)."""
    value = claims.get(name)
    if value is None:
        if required:
            raise _invalid(f"missing `{name}`")
        return None
    if type(value) is not int:
        raise _invalid(f"`{name}` is not an integer")
    return value


def _str_claim(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is not None and not isinstance(value, str):
        raise _invalid(f"`{name}` is not a string")
    return value


def _normalise_typ(typ: str) -> str:
    # RFC 7515 section 4.1.9 / RFC 8725 section 3.11: media type, case-insensitive,
    # "application/" may be omitted.
    typ = typ.lower()
    return typ.removeprefix("application/")


def evidence_from_claims(claims: dict[str, Any], profile: IdpProfile | None = None) -> Evidence:
    """``acr`` (str or absent), ``amr`` (list of str, absent -> ()), ``auth_time`` (int or
    absent), from the claims the profile names (default: generic), typed strictly:
    anything else is token-invalid."""
    try:
        evidence = read_evidence(profile or PROFILES["generic"], claims)
    except ClaimError as exc:
        raise _invalid(str(exc)) from None
    if evidence.acr is not None and _CONTROL.search(evidence.acr):
        raise _invalid("control character in `acr`")
    return evidence


def accepted_typs(typs: tuple[str | None, ...] | None) -> frozenset[str | None] | None:
    """The normalised ``typ`` values accepted (None in the set: no ``typ`` header)."""
    if typs is None:
        return None
    return frozenset(None if t is None else _normalise_typ(t) for t in typs)


def token_session_id(token: str) -> str:
    """The session id of a token without ``sid``: a hash of the token itself."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class IdToken:
    """A verified ID token: who authenticated, what the authentication proved (its
    Evidence, typed strictly) and the claims as the IdP sent them."""

    issuer: str
    subject: str
    evidence: Evidence
    session_id: str | None
    claims: Mapping[str, Any]


class AccessTokenVerifier(Protocol):
    """What the Check path and the step-up endpoints need to turn a token into an Identity."""

    async def verify_access_token(self, token: str, now: int) -> Identity: ...


class IdTokenVerifier(Protocol):
    """What the step-up callback needs to verify the IdP's ID token (OIDC Core 3.1.3.7)."""

    async def verify_id_token(self, token: str, now: int, *, nonce: str) -> IdToken: ...


class StepupTokens(AccessTokenVerifier, IdTokenVerifier, Protocol):
    """Both: what the step-up endpoints verify (the session's access token at ``start``,
    the IdP's ID token at the callback)."""


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0


class CacheObserver(Protocol):
    """Told about the verifier's cache as it changes (``authz.ops.metrics``): a lookup
    answered from it, a lookup that was not, and the number of entries after a change."""

    def hit(self) -> None: ...

    def miss(self) -> None: ...

    def entries(self, n: int) -> None: ...


class _NoObserver:
    def hit(self) -> None:
        pass

    def miss(self) -> None:
        pass

    def entries(self, n: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _Cached:
    identity: Identity
    nbf: int | None
    key: jwt.PyJWK
    kid: str | None
    alg: str


class TokenVerifier:
    """Verifies compact JWS tokens against a :class:`KeySource` and ``OidcSettings``."""

    def __init__(
        self, settings: OidcSettings, keys: KeySource, *, profile: IdpProfile | None = None
    ) -> None:
        self._settings = settings
        self._keys = keys
        self.profile = profile if profile is not None else resolve_profile(settings)
        self._clients = frozenset(settings.allowed_clients)
        self._algorithms = frozenset(settings.algorithms) - _NEVER
        self._jws = jwt.PyJWS(
            algorithms=list(self._algorithms), options={"enforce_minimum_key_length": True}
        )
        self._typ = accepted_typs(self.profile.token_typ)
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self._cache_size = settings.token_cache_size
        self.cache_stats = CacheStats()
        self._observer: CacheObserver = _NoObserver()

    def observe_cache(self, observer: CacheObserver) -> None:
        """Report every lookup and every change of the cache's size to ``observer`` (the
        service's metrics); the current size is reported at once."""
        self._observer = observer
        observer.entries(len(self._cache))

    # -- access tokens -------------------------------------------------------------------

    async def verify_access_token(self, token: str, now: int) -> Identity:
        """Verify a bearer access token and build the :class:`Identity` it proves.

        Verified tokens are cached (LRU, ``token_cache_size``) until their ``exp``; a hit
        re-checks ``exp``/``nbf`` against ``now`` and that the signing key is still in the
        current key set (so a key withdrawn from the JWKS revokes cached tokens).
        """
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise _invalid("token too large or not a string")
        digest = hashlib.sha256(token.encode()).digest() if self._cache_size else b""
        hit = self._cache.get(digest) if self._cache_size else None
        if hit is not None:
            leeway = self._settings.leeway_s
            if (
                now < hit.identity.expires_at
                and (hit.nbf is None or now >= hit.nbf - leeway)
                and self._keys.get(hit.kid, hit.alg) is hit.key
            ):
                self._cache.move_to_end(digest)
                self.cache_stats.hits += 1
                self._observer.hit()
                return hit.identity
            del self._cache[digest]  # fall through: full verification decides
            self._observer.entries(len(self._cache))
        self.cache_stats.misses += 1
        self._observer.miss()
        claims, header, key = await self._verify(
            token, now, audience=self._settings.audience, typ=self._typ
        )
        identity = self._identity(claims, token)
        if self._cache_size and now < identity.expires_at:
            self._cache[digest] = _Cached(
                identity,
                _int_claim(claims, "nbf", required=False),
                key,
                header.get("kid"),
                header["alg"],
            )
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            self._observer.entries(len(self._cache))
        return identity

    def _identity(self, claims: dict[str, Any], token: str) -> Identity:
        exp = _int_claim(claims, "exp", required=True)
        iat = _int_claim(claims, "iat", required=True)
        assert exp is not None and iat is not None
        return self.identity_from_claims(
            claims, expires_at=exp, issued_at=iat, token_sid=token_session_id(token)
        )

    def identity_from_claims(
        self, claims: dict[str, Any], *, expires_at: int, issued_at: int, token_sid: str
    ) -> Identity:
        """The Identity verified claims prove, read the profile's way: the user from its
        subject claim (``uid`` for Okta, ``oid`` for Entra), ``sid`` or the fallback, the
        evidence, the client (checked against ``allowed_clients``). Shared by JWT
        verification and RFC 7662 introspection, so both give the same Identity."""
        p = self.profile
        subject = _str_claim(claims, p.subject_claims[0])
        if not subject:
            raise _invalid(f"missing `{p.subject_claims[0]}`")
        if _CONTROL.search(subject):
            raise _invalid(f"control character in `{p.subject_claims[0]}`")
        sid = _str_claim(claims, p.sid_claim)
        if sid is None and self._settings.sid_fallback_claim is not None:
            sid = _str_claim(claims, self._settings.sid_fallback_claim)
            if not sid:
                raise _invalid("no session id (`sid` or the configured fallback claim)")
        if sid is None:
            # No `sid`: the session is this token. A step-up made with it is not reused
            # by another token of the same user (another browser, a refreshed token).
            sid = token_sid
        if not sid:
            raise _invalid("empty `sid`")
        evidence = evidence_from_claims(claims, p)
        try:
            client_id = client_of(p, claims)
        except ClaimError as exc:
            raise _invalid(str(exc)) from None
        if self._clients and client_id not in self._clients:
            raise _invalid("client not in oidc.allowed_clients")
        return Identity(
            issuer=claims["iss"],
            subject=subject,
            session_id=sid,
            evidence=evidence,
            expires_at=expires_at,
            client_id=client_id,
            issued_at=issued_at,
        )

    # -- ID tokens -----------------------------------------------------------------------

    async def verify_id_token(self, token: str, now: int, *, nonce: str) -> IdToken:
        """Verify an ID token from the step-up round trip (OIDC Core 3.1.3.7, 3.1.3.8).

        ``aud`` must contain ``client_id``; with several audiences ``azp`` is required, and
        whenever present it must equal ``client_id``. ``nonce`` must match exactly.
        """
        if not nonce:
            raise _invalid("no expected nonce")  # a caller bug must not disable the check
        client_id = self._settings.client_id
        claims = await self.verify_claims(token, now, audience=client_id, typ=None)
        got = claims.get("nonce")
        if not isinstance(got, str) or not hmac.compare_digest(got.encode(), nonce.encode()):
            raise _invalid("`nonce` mismatch")
        return self._id_token(claims)

    async def verify_backchannel_id_token(
        self, token: str, now: int, *, auth_req_id: str
    ) -> IdToken:
        """Verify the ID token of an OpenID CIBA token response (poll mode): the rules of
        ``verify_id_token`` without the nonce, which a backchannel request never carries.

        A token that does carry a ``nonce`` was issued for a front-channel request, not
        this one, and is refused. The ``urn:openid:params:jwt:claim:auth_req_id`` claim
        (CIBA Core 1.0, required in push mode) must name this request when present.
        """
        if not auth_req_id:
            raise _invalid("no expected auth_req_id")
        claims = await self.verify_claims(token, now, audience=self._settings.client_id, typ=None)
        if "nonce" in claims:
            raise _invalid("`nonce` in a backchannel ID token")
        bound = claims.get(AUTH_REQ_ID_CLAIM)
        if bound is not None and (
            not isinstance(bound, str)
            or not hmac.compare_digest(bound.encode(), auth_req_id.encode())
        ):
            raise _invalid("`auth_req_id` claim names another request")
        return self._id_token(claims)

    def _id_token(self, claims: dict[str, Any]) -> IdToken:
        client_id = self._settings.client_id
        aud = claims["aud"]
        azp = claims.get("azp")
        if isinstance(aud, list) and len(aud) > 1 and azp is None:
            raise _invalid("several audiences and no `azp`")
        if azp is not None and azp != client_id:
            raise _invalid("`azp` is not our client_id")
        # The user as the profile names them in ID tokens (`sub`; Entra's `oid`), so the
        # grant rule's exact comparison with the access token's user is the profile's pair
        # (profiles.same_subject): never `sub` standing in for a missing claim.
        claim = self.profile.subject_claims[1]
        subject = _str_claim(claims, claim)
        if not subject:
            raise _invalid(f"missing `{claim}`")
        if _CONTROL.search(subject):
            raise _invalid(f"control character in `{claim}`")
        return IdToken(
            issuer=claims["iss"],
            subject=subject,
            evidence=evidence_from_claims(claims, self.profile),
            session_id=_str_claim(claims, "sid"),
            claims=MappingProxyType(claims),
        )

    # -- shared core ---------------------------------------------------------------------

    async def verify_claims(
        self, token: str, now: int, *, audience: str, typ: str | None, require_sub: bool = True
    ) -> dict[str, Any]:
        """Verify signature, ``iss``, ``aud``, ``sub`` and times; return the claims.

        ``require_sub=False`` (logout tokens, which may name only a ``sid``): a ``sub``
        that is present is still checked."""
        claims, _, _ = await self._verify(
            token,
            now,
            audience=audience,
            typ=None if typ is None else accepted_typs((typ,)),
            require_sub=require_sub,
        )
        return claims

    async def _verify(
        self,
        token: str,
        now: int,
        *,
        audience: str,
        typ: frozenset[str | None] | None,
        require_sub: bool = True,
    ) -> tuple[dict[str, Any], dict[str, Any], jwt.PyJWK]:
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise _invalid("token too large or not a string")
        if not _COMPACT_JWS.fullmatch(token):
            raise _invalid("not a compact JWS")
        try:
            raw_header = base64url_decode(token.partition(".")[0])
        except ValueError:
            raise _invalid("malformed header") from None
        header = _loads(raw_header, "header")

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _invalid("`alg` not allowed")
        if "crit" in header:
            raise _invalid("`crit` header not supported")  # RFC 7515 section 4.1.11
        kid = header.get("kid")
        if kid is not None and (
            not isinstance(kid, str) or len(kid) > MAX_KID_LEN or not _KID.fullmatch(kid)
        ):
            # Key ids are short tokens (base64url thumbprints, names, UUIDs): a path, a
            # URL, quotes, spaces or control characters are no key's id. Refused as
            # malformed, before any key lookup or refetch it could trigger.
            raise _invalid("bad `kid`")
        if typ is not None:
            got = header.get("typ")
            if got is not None and not isinstance(got, str):
                raise _invalid("`typ` mismatch")
            if (None if got is None else _normalise_typ(got)) not in typ:
                raise _invalid("`typ` mismatch")
        # `jwk`, `jku`, `x5u`, `x5c` are deliberately ignored: keys come only from our source.

        key = await self._key(kid, alg)
        try:
            raw = self._jws.decode_complete(token, key=key, algorithms=[alg])["payload"]
        except jwt.PyJWTError:
            raise _invalid("signature verification failed") from None
        claims = _loads(raw, "payload")
        self._check_claims(claims, now, audience, require_sub=require_sub)
        return claims, header, key

    async def _key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        key = self._keys.get(kid, alg)
        if key is None:
            held = self._keys.retry_after(kid)
            if held is not None:
                await self._keys.refresh()  # returns at once; a reload is queued for later
                # The refetch that could find this key is held back by the rate limit: we
                # do not know the token is bad, only that we cannot check it yet. A second
                # key rotation inside the interval lands here, not on invalid_token.
                raise KeysUnavailable(
                    "key not in the current set; refetch rate-limited",
                    retry_after_s=max(1, math.ceil(held)),
                )
            try:  # rate limited inside the source; the fetch outlives this wait
                async with asyncio.timeout(self._settings.jwks_refresh_wait_ms / 1000):
                    await self._keys.refresh()
            except TimeoutError:
                raise KeysUnavailable("verification keys are being refreshed") from None
            key = self._keys.get(kid, alg)
        if key is None:
            if not self._keys.ready:
                raise KeysUnavailable("no verification keys loaded")
            raise _invalid("no key for this `kid`/`alg`")
        return key

    def _check_claims(
        self, claims: dict[str, Any], now: int, audience: str, *, require_sub: bool = True
    ) -> None:
        s = self._settings
        if claims.get("iss") != s.issuer:  # exact: no prefix, no trailing-slash folding
            raise _invalid("`iss` mismatch")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(auds, list) or not all(isinstance(a, str) for a in auds):
            raise _invalid("`aud` is not a string or a list of strings")
        if audience not in auds:
            raise _invalid("`aud` mismatch")
        sub = claims.get("sub")
        if (require_sub or sub is not None) and (not isinstance(sub, str) or not sub):
            raise _invalid("missing `sub`")
        if isinstance(sub, str) and _CONTROL.search(sub):
            raise _invalid("control character in `sub`")
        exp = _int_claim(claims, "exp", required=True)
        nbf = _int_claim(claims, "nbf", required=False)
        iat = _int_claim(claims, "iat", required=True)
        assert exp is not None and iat is not None
        if now >= exp + s.leeway_s:  # RFC 7519 4.1.4: "on or after" the expiry
            raise TokenError("token expired", reason=Reason.TOKEN_EXPIRED)
        if nbf is not None and now < nbf - s.leeway_s:
            raise _invalid("token not yet valid (`nbf`)")
        if iat > now + s.leeway_s:
            raise _invalid("`iat` in the future")
