"""Token side of the development OIDC provider: credentials checks, codes, token minting,
and the token endpoint (RFC 6749 section 3.2, RFC 7636, RFC 9068, OIDC Core section 3.1.3).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import jwt
import pyotp
from aiohttp import web
from multidict import MultiDictProxy

from authz.devidp.config import DevClient, DevIdpConfig, DevUser, SigningKey
from authz.devidp.misbehave import Misbehaviour

log = logging.getLogger("authz.devidp")

MFA_ACRS = frozenset({"mfa", "phr"})
_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")  # RFC 7636 section 4.1
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 section 5.1
# Compared against when the username is unknown, so both paths cost one compare_digest.
_DUMMY_PASSWORD = secrets.token_bytes(32)


class OAuthError(Exception):
    """An RFC 6749 section 5.2 error: ``error`` is the registered code."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status


@dataclass(frozen=True)
class Authentication:
    """The result of a successful sign-in: what goes into ``acr``/``amr``/``auth_time``."""

    user: str
    sid: str
    auth_time: int
    acr: str
    amr: tuple[str, ...]


@dataclass(frozen=True)
class CodeGrant:
    client_id: str
    redirect_uri: str
    code_challenge: str
    scope: str
    nonce: str | None
    auth: Authentication
    expires_at: float


def new_sid() -> str:
    return secrets.token_urlsafe(16)


def check_password(users: Mapping[str, DevUser], username: str, password: str) -> bool:
    user = users.get(username)
    expected = user.password.encode() if user else _DUMMY_PASSWORD
    ok = hmac.compare_digest(expected, password.encode())
    return ok and user is not None


def check_totp(user: DevUser, otp: str, now: float) -> bool:
    """RFC 6238 with one step of drift either side. A used code is not remembered (dev only)."""
    otp = otp.replace(" ", "")
    if not (otp.isdigit() and len(otp) == 6):
        return False
    return bool(pyotp.TOTP(user.totp_secret).verify(otp, for_time=int(now), valid_window=1))


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class TokenEndpoint:
    """``POST /token``. Holds the one-time authorization codes."""

    def __init__(
        self, config: DevIdpConfig, key: SigningKey, knobs: Misbehaviour | None = None
    ) -> None:
        self._config = config
        self._key = key
        self._codes: dict[str, CodeGrant] = {}
        # TEST-ONLY misbehaviour (shared with the Provider, which may change it in place).
        self.knobs = knobs if knobs is not None else config.misbehave
        self._last_id_token: str | None = None

    def issue_code(self, grant: CodeGrant) -> str:
        now = self._config.clock()
        for stale in [c for c, g in self._codes.items() if g.expires_at <= now]:
            del self._codes[stale]
        code = secrets.token_urlsafe(32)
        self._codes[code] = grant
        return code

    async def handle(self, request: web.Request) -> web.Response:
        try:
            form = await request.post()
            client_id = self._authenticate_client(request, form)
            grant_type = _field(form, "grant_type")
            if grant_type == "authorization_code":
                body = self._authorization_code(client_id, form)
            elif grant_type == "password":
                body = self._password(client_id, form)
            elif not grant_type:
                raise OAuthError("invalid_request", "grant_type is required")
            else:
                raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r}")
        except OAuthError as exc:
            log.info("token request refused: %s", exc.error)
            headers = dict(_NO_STORE)
            if exc.error == "invalid_client":
                headers["WWW-Authenticate"] = 'Basic realm="devidp"'
            error = {"error": exc.error, "error_description": exc.description}
            return web.json_response(error, status=exc.status, headers=headers)
        return web.json_response(body, headers=_NO_STORE)

    def _authenticate_client(self, request: web.Request, form: MultiDictProxy[Any]) -> str:
        """client_secret_basic or client_secret_post, exactly one (RFC 6749 section 2.3.1)."""
        header = request.headers.get("Authorization", "")
        posted_id = _field(form, "client_id")
        posted_secret = _field(form, "client_secret")
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "basic" or posted_secret:
                raise OAuthError("invalid_request", "use exactly one client authentication method")
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise OAuthError("invalid_client", "malformed Basic credentials", 401) from exc
            raw_id, sep, raw_secret = decoded.partition(":")
            if not sep:
                raise OAuthError("invalid_client", "malformed Basic credentials", 401)
            # Section 2.3.1: both parts are form-urlencoded before Basic encoding.
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            if posted_id and posted_id != client_id:
                raise OAuthError("invalid_request", "client_id does not match credentials")
        else:
            client_id, secret = posted_id, posted_secret
        client: DevClient | None = self._config.clients.get(client_id)
        expected = client.secret.encode() if client else _DUMMY_PASSWORD
        if not (hmac.compare_digest(expected, secret.encode()) and client is not None):
            raise OAuthError("invalid_client", "client authentication failed", 401)
        return client_id

    def _authorization_code(self, client_id: str, form: MultiDictProxy[Any]) -> dict[str, Any]:
        # Popped before any check: a code is spent by its first presentation, right or wrong.
        grant = self._codes.pop(_field(form, "code"), None)
        if grant is None or grant.client_id != client_id:
            raise OAuthError("invalid_grant", "unknown, used or foreign authorization code")
        if self._config.clock() >= grant.expires_at:
            raise OAuthError("invalid_grant", "authorization code expired")
        if _field(form, "redirect_uri") != grant.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri differs from the authorization request")
        verifier = _field(form, "code_verifier")
        if not _VERIFIER.match(verifier):
            raise OAuthError("invalid_grant", "code_verifier missing or malformed")
        if not hmac.compare_digest(s256(verifier), grant.code_challenge):
            raise OAuthError("invalid_grant", "code_verifier does not match code_challenge")
        log.info(
            "code exchanged client=%s user=%s acr=%s", client_id, grant.auth.user, grant.auth.acr
        )
        return self.mint(client_id, grant.auth, grant.scope, grant.nonce)

    def _password(self, client_id: str, form: MultiDictProxy[Any]) -> dict[str, Any]:
        """Resource owner password grant: DEV ONLY, so API clients in the demo and tests can get
        a token with a chosen ``acr`` without a browser. ``sid`` keeps a session across calls."""
        username = _field(form, "username")
        if not check_password(self._config.users, username, _field(form, "password")):
            raise OAuthError("invalid_grant", "invalid username or password")
        now = self._config.clock()
        otp = _field(form, "otp")
        if "otp" in form and not otp.strip():
            # `-d otp=$(... totp)` whose helper failed: refuse rather than quietly issue a
            # password-only token that then meets a 401 nobody can explain.
            raise OAuthError(
                "invalid_request",
                "otp is empty (did the TOTP helper fail?): send a 6-digit code, or no otp",
            )
        otp_ok = bool(otp) and check_totp(self._config.users[username], otp, now)
        if otp and not otp_ok:
            raise OAuthError("invalid_grant", "invalid one-time code")
        if MFA_ACRS.intersection(_field(form, "acr_values").split()) and not otp_ok:
            raise OAuthError("invalid_grant", "acr_values asks for mfa: a valid otp is required")
        auth = Authentication(
            user=username,
            sid=_field(form, "sid") or new_sid(),
            auth_time=int(now),
            acr="mfa" if otp_ok else "pwd",
            amr=("pwd", "otp") if otp_ok else ("pwd",),
        )
        log.info("password grant client=%s user=%s acr=%s", client_id, username, auth.acr)
        return self.mint(client_id, auth, _field(form, "scope") or "openid", None)

    def mint(
        self, client_id: str, auth: Authentication, scope: str, nonce: str | None
    ) -> dict[str, Any]:
        """Access token (RFC 9068 JWT profile) and ID token (OIDC Core section 2)."""
        config = self._config
        iat = int(config.clock())
        exp = iat + config.token_ttl_s
        common = {
            "iss": config.issuer,
            "sub": auth.user,
            "iat": iat,
            "exp": exp,
            "auth_time": auth.auth_time,
            "acr": auth.acr,
            "amr": list(auth.amr),
            "sid": auth.sid,
        }
        common = self.knobs.claims(common)
        access_claims = {
            **common,
            "aud": config.access_token_audience,
            "client_id": client_id,
            "jti": secrets.token_urlsafe(16),
            "scope": scope,
        }
        access_token = self._sign(access_claims, "at+jwt")
        user = config.users[auth.user]
        id_claims: dict[str, Any] = {
            **common,
            "aud": client_id,
            "azp": client_id,
            "at_hash": _left_half_hash(access_token),
            "name": user.name,
            "email": user.email,
        }
        if nonce is not None:
            id_claims["nonce"] = nonce
        id_token = self._sign(self.knobs.id_claims(id_claims), "JWT")
        if self.knobs.replay_id_token and self._last_id_token is not None:
            id_token, self._last_id_token = self._last_id_token, id_token
        else:
            self._last_id_token = id_token
        return {
            "access_token": access_token,
            "id_token": id_token,
            "token_type": "Bearer",
            "expires_in": config.token_ttl_s,
            "scope": scope,
        }

    def sign(self, claims: dict[str, Any], typ: str) -> str:
        """Claims signed with the provider's key (the logout tokens of authz.devidp.logout)."""
        return self._sign(claims, typ)

    def _sign(self, claims: dict[str, Any], typ: str) -> str:
        headers = {"kid": self._key.kid, "typ": typ}
        return jwt.encode(claims, self._key.private_key, algorithm="RS256", headers=headers)


def _left_half_hash(token: str) -> str:
    """OIDC Core section 3.1.3.6 ``at_hash`` for RS256."""
    digest = hashlib.sha256(token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode("ascii")


def _field(form: MultiDictProxy[Any], name: str) -> str:
    value = form.get(name, "")
    return value if isinstance(value, str) else ""
