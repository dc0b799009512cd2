"""Logout: OIDC Back-Channel Logout 1.0 and RP-Initiated Logout 1.0.

``POST <prefix>/backchannel-logout`` is called by the IdP, server to server, with a logout
token (a JWT it signs). The token is verified as the spec's section 2.6 says -- signature
with the IdP's keys (the JWKS the Check uses), ``iss``, ``aud`` (our client id), ``iat``
(not older than ``logout.max_token_age_s``) and ``exp``, ``events`` naming the back-channel
logout event, a ``sid`` or a ``sub``, no ``nonce`` (so an ID token is never taken for a
logout token) -- and its ``jti`` is remembered in Redis for as long as the token would be
accepted, so a replay is refused. A token naming a ``sid`` ends that session (its grants
deleted, its tokens refused by the next Check); one naming only a ``sub`` ends all of the
user's sessions. Answers: ``200`` (done) or ``400`` with a JSON ``error`` (section 2.8),
both ``Cache-Control: no-store``.

``GET <prefix>/logout`` shows a confirmation page and changes nothing; ``POST`` (same
origin only: the ``Origin`` header must be the service's public origin) ends the local
state -- the session's grants revoked, the step-up cookies cleared -- and sends the browser
to the IdP's ``end_session_endpoint`` (discovery) with ``client_id`` and, when the form
names one from ``logout.post_logout_redirect_uris`` (else the first), a
``post_logout_redirect_uri``. The service keeps no ID token, so no ``id_token_hint`` is
sent.

Both are audited (``logout``: the user, the session key, ``via``, the outcome).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from typing import Any, Protocol
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from aiohttp import web

from authz.audit.mapping import logout as logout_event
from authz.audit.sinks import AuditTrail
from authz.check.tokens import MAX_TOKEN_BYTES, AccessTokenVerifier
from authz.config.settings import Settings
from authz.core.attributes import cookie_values
from authz.core.reasons import Reason
from authz.core.session import Identity, session_key, user_key
from authz.errors import KeysUnavailable, StoreError, TokenError
from authz.stepup.oidc import ProviderMetadata
from authz.stepup.pages import page
from authz.stepup.profiles import IdpProfile

log = logging.getLogger("authz.stepup.logout")

BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
VIA_BACKCHANNEL = "back-channel"
VIA_RP = "rp-initiated"
# RFC 8417 / Back-Channel Logout 1.0 section 2.4: "logout+jwt" is the explicit type; "JWT"
# and no `typ` are what most IdPs send. Anything else (an access token's "at+jwt") is
# another kind of token.
_TYPS = frozenset({None, "jwt", "logout+jwt", "application/logout+jwt"})
_MAX_FORM = MAX_TOKEN_BYTES + 512
# `jti`, `sid` and the user: non-empty strings without control characters (the access
# token's user is held to the same rule), bounded.
_ID = re.compile(r"[^\x00-\x1f\x7f]{1,1024}")


class LogoutRefused(Exception):
    """A refused logout request: its reason slug, the spec's ``error`` and a description."""

    def __init__(
        self,
        reason: Reason,
        description: str,
        *,
        error: str = "invalid_request",
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description
        self.error = error
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class LogoutToken:
    """A verified logout token: whose sessions to end, and how long to remember its jti."""

    issuer: str
    subject: str | None  # the profile's user claim (``sub`` for most IdPs)
    sid: str | None
    jti: str
    remember_s: int


class LogoutTokenVerifier(Protocol):
    """``authz.check.tokens.TokenVerifier``: the IdP's keys, iss, aud and times."""

    profile: IdpProfile

    async def verify_claims(
        self, token: str, now: int, *, audience: str, typ: str | None, require_sub: bool = True
    ) -> dict[str, Any]: ...


class LogoutStore(Protocol):
    """The store functions logout uses (the Sessions API's revocations, the jti memory)."""

    async def remember_once(self, key: str, ttl_s: int) -> bool: ...
    async def revoke_session(self, user: str, session: str, now: int) -> bool: ...
    async def revoke_user(self, user: str, now: int) -> int: ...


def _id_claim(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise LogoutRefused(Reason.LOGOUT_TOKEN_INVALID, f"`{name}` is not a plain string")
    return value


async def verify_logout_token(
    raw: str,
    now: int,
    *,
    tokens: LogoutTokenVerifier,
    client_id: str,
    leeway_s: int,
    max_age_s: int,
) -> LogoutToken:
    """Back-Channel Logout 1.0 section 2.6, every step; raises :class:`LogoutRefused`."""
    try:
        claims = await tokens.verify_claims(
            raw, now, audience=client_id, typ=None, require_sub=False
        )
    except KeysUnavailable as exc:
        raise LogoutRefused(
            Reason.KEYS_UNAVAILABLE,
            "the IdP's keys cannot be checked now",
            error="temporarily_unavailable",
            retry_after_s=exc.retry_after_s,
        ) from None
    except TokenError as exc:
        raise LogoutRefused(Reason.LOGOUT_TOKEN_INVALID, str(exc)) from None
    typ = jwt.get_unverified_header(raw).get("typ")  # the signed header, verified above
    if typ is not None and (not isinstance(typ, str) or typ.lower() not in _TYPS):
        raise LogoutRefused(Reason.LOGOUT_TOKEN_INVALID, "`typ` is not a logout token's")
    iat = claims["iat"]  # an int: checked by verify_claims, as `exp`
    if now - iat > max_age_s + leeway_s:
        raise LogoutRefused(Reason.LOGOUT_TOKEN_INVALID, "the logout token is too old (`iat`)")
    events = claims.get("events")
    if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_EVENT), dict):
        raise LogoutRefused(Reason.LOGOUT_EVENT_MISSING, "`events` names no back-channel logout")
    if "nonce" in claims:
        raise LogoutRefused(Reason.LOGOUT_NONCE_PRESENT, "a logout token carries no `nonce`")
    jti = _id_claim(claims, "jti")
    if jti is None:
        raise LogoutRefused(Reason.LOGOUT_TOKEN_INVALID, "no `jti`")
    sid = _id_claim(claims, "sid")
    # The user, named as the ID token names it: `sub` (Okta's access tokens say `uid`, the
    # same value; Entra's `oid` never comes in a logout token, so that profile is refused).
    user_claim = tokens.profile.subject_claims[1]
    subject = _id_claim(claims, user_claim)
    if subject is None:
        what = "neither `sid` nor `sub`" if sid is None else f"no `{user_claim}`"
        raise LogoutRefused(
            Reason.LOGOUT_SUBJECT_MISSING, f"{what}: the user's sessions cannot be found"
        )
    # Accepted while now < exp + leeway and now - iat <= max_age + leeway: remember the
    # jti until both have passed.
    until = min(int(claims["exp"]) + leeway_s, iat + max_age_s + leeway_s + 1)
    return LogoutToken(claims["iss"], subject, sid, jti, max(1, until - now))


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class LogoutApp:
    """The two logout endpoints on the step-up port."""

    def __init__(
        self,
        *,
        settings: Settings,
        logout_tokens: LogoutTokenVerifier,
        access_tokens: AccessTokenVerifier,
        store: LogoutStore,
        metadata: ProviderMetadata | None = None,
        auditor: AuditTrail | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.s = settings.logout
        self.stepup = settings.stepup
        self.oidc = settings.oidc
        self.logout_tokens = logout_tokens
        self.access_tokens = access_tokens
        self.store = store
        self.metadata: ProviderMetadata | None = None
        self.auditor = auditor
        self.clock = clock
        self.origin = _origin(settings.stepup.public_url)
        self.token_cookie = self.stepup.cookie(self.oidc.token_cookie)
        self.state_cookie = self.stepup.cookie(self.stepup.state_cookie)
        self.set_metadata(metadata)

    def set_metadata(self, metadata: ProviderMetadata | None) -> None:
        """The IdP's discovery document (its end_session_endpoint), once it is in: until then
        a sign-out ends the local session only."""
        self.metadata = metadata
        # The sign-out form posts here and is redirected on to the IdP (or straight to the
        # return address): browsers apply form-action to those redirects too.
        end_session = metadata.end_session_endpoint if metadata is not None else None
        targets = [end_session, *self.s.post_logout_redirect_uris]
        allowed = sorted({_origin(t) for t in targets if t})
        self._csp = (
            "default-src 'none'; form-action 'self' "
            + " ".join(allowed)
            + "; frame-ancestors 'none'; base-uri 'none'"
        )

    def add_routes(self, app: web.Application) -> None:
        p = self.stepup.path_prefix
        if self.s.backchannel:
            app.router.add_post(f"{p}/backchannel-logout", self.backchannel)
        app.router.add_get(f"{p}/logout", self.confirm)
        app.router.add_post(f"{p}/logout", self.rp_logout)

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        self.add_routes(app)
        return app

    def _now(self) -> int:
        return int(self.clock())

    def _audit(
        self,
        via: str,
        *,
        user: str | None,
        session: str | None,
        failure: Reason | None = None,
        ended: int | None = None,
        client_ip: str | None = None,
    ) -> None:
        if self.auditor is not None:
            self.auditor.emit(
                logout_event(
                    via=via,
                    user=user,
                    session=session,
                    failure=failure,
                    issuer=self.oidc.issuer,
                    grants_ended=ended,
                    client_ip=client_ip,
                    ts_ms=int(self.clock() * 1000),
                )
            )

    # -- back-channel ---------------------------------------------------------------------

    async def backchannel(self, request: web.Request) -> web.Response:
        now = self._now()
        try:
            token = await self._logout_token(request)
            verified = await verify_logout_token(
                token,
                now,
                tokens=self.logout_tokens,
                client_id=self.oidc.client_id,
                leeway_s=self.oidc.leeway_s,
                max_age_s=self.s.max_token_age_s,
            )
        except LogoutRefused as exc:
            return self._refused(exc, user=None, session=None)
        assert verified.subject is not None
        user = f"{verified.issuer}|{verified.subject}"
        uk = user_key(verified.issuer, verified.subject)
        sk = (
            session_key(verified.issuer, verified.subject, verified.sid)
            if verified.sid is not None
            else None
        )
        once = hashlib.sha256(f"{verified.issuer}\n{verified.jti}".encode()).hexdigest()[:40]
        try:
            # Before anything is ended: a replayed token (captured, sent again after the
            # user signed in anew) must end nothing.
            if not await self.store.remember_once(f"logout-jti:{once}", verified.remember_s):
                raise LogoutRefused(Reason.LOGOUT_REPLAYED, "this logout token was used before")
            ended = await self._end(uk, sk, now)
        except StoreError:
            return self._refused(
                LogoutRefused(
                    Reason.STORE_ERROR,
                    "the session store is unavailable",
                    error="temporarily_unavailable",
                ),
                user=user,
                session=sk,
            )
        except LogoutRefused as exc:
            return self._refused(exc, user=user, session=sk)
        log.info(
            "back-channel logout",
            extra={"scope": "session" if sk is not None else "user", "sessions_ended": ended},
        )
        self._audit(VIA_BACKCHANNEL, user=user, session=sk, ended=ended)
        return web.Response(status=200, headers={"Cache-Control": "no-store"})

    async def _end(self, uk: str, sk: str | None, now: int) -> int:
        """End the named session; a sid never seen (sessions keyed by the token) or no sid
        at all ends every session of the user. How many sessions were ended."""
        if sk is not None:
            if await self.store.revoke_session(uk, sk, now):
                return 1
            if self.s.unknown_sid == "session":
                return 0
        return await self.store.revoke_user(uk, now)

    async def _logout_token(self, request: web.Request) -> str:
        if request.content_type != "application/x-www-form-urlencoded":
            raise LogoutRefused(Reason.BAD_REQUEST, "send application/x-www-form-urlencoded")
        raw = await request.content.read(_MAX_FORM + 1)
        if len(raw) > _MAX_FORM:
            raise LogoutRefused(Reason.BAD_REQUEST, "the request is too large")
        try:
            form = parse_qs(raw.decode("ascii"), keep_blank_values=True, max_num_fields=8)
        except (UnicodeDecodeError, ValueError):
            raise LogoutRefused(Reason.BAD_REQUEST, "the form cannot be read") from None
        values = form.get("logout_token", [])
        if len(values) != 1 or not values[0]:
            raise LogoutRefused(Reason.BAD_REQUEST, "exactly one `logout_token` is required")
        return values[0]

    def _refused(
        self, exc: LogoutRefused, *, user: str | None, session: str | None
    ) -> web.Response:
        log.warning("back-channel logout refused", extra={"reason": exc.reason})
        self._audit(VIA_BACKCHANNEL, user=user, session=session, failure=exc.reason)
        headers = {"Cache-Control": "no-store"}
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(exc.retry_after_s)
        return web.json_response(
            {"error": exc.error, "error_description": exc.description},
            status=400,
            headers=headers,
        )

    # -- RP-initiated ---------------------------------------------------------------------

    async def confirm(self, request: web.Request) -> web.Response:
        """A page with a sign-out button: a GET (a link, an image, a prefetch) ends nothing."""
        action = escape(f"{self.stepup.path_prefix}/logout", quote=True)
        body = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            "<title>Sign out</title></head><body><main>"
            "<h1>Sign out</h1><p>Sign out of this site and of your identity provider?</p>"
            f'<form method="post" action="{action}"><button type="submit">Sign out</button>'
            f'</form><p><a href="{escape(self.stepup.landing_path, quote=True)}">Cancel</a>'
            "</p></main></body></html>"
        )
        return web.Response(
            text=body,
            content_type="text/html",
            headers={
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "DENY",
                "Content-Security-Policy": self._csp,
            },
        )

    def _identity_token(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip() or None
        values = cookie_values(request.headers.get("Cookie", ""), self.token_cookie)
        return values[0] if len(values) == 1 and values[0] else None

    async def rp_logout(self, request: web.Request) -> web.StreamResponse:
        client_ip = request.headers.get(self.stepup.peer_header) or None
        if request.headers.get("Origin") != self.origin:
            # A cross-site form (or a client that hides its origin) must not sign anyone out.
            self._audit(
                VIA_RP, user=None, session=None, failure=Reason.ORIGIN_MISSING, client_ip=client_ip
            )
            return page(
                403,
                "Sign-out not started here",
                "Use the sign-out button on this site's own page.",
                back=f"{self.stepup.path_prefix}/logout",
            )
        form = await request.post() if request.can_read_body else {}
        asked = form.get("post_logout_redirect_uri")
        allowed = self.s.post_logout_redirect_uris
        if asked is not None and (not isinstance(asked, str) or asked not in allowed):
            self._audit(
                VIA_RP, user=None, session=None, failure=Reason.BAD_REQUEST, client_ip=client_ip
            )
            return page(
                400,
                "Sign-out address not allowed",
                "The address to return to after signing out is not one this site allows.",
                back=self.stepup.landing_path,
            )
        after = str(asked) if asked is not None else (allowed[0] if allowed else None)
        now = self._now()
        identity: Identity | None = None
        token = self._identity_token(request)
        if token is not None:
            try:
                identity = await self.access_tokens.verify_access_token(token, now)
            except TokenError:
                identity = None  # nothing of ours to end; the cookies still go
        user = sk = None
        if identity is not None:
            user = identity.user
            sk = session_key(identity.issuer, identity.subject, identity.session_id)
            try:
                await self.store.revoke_session(
                    user_key(identity.issuer, identity.subject), sk, now
                )
            except StoreError:
                self._audit(
                    VIA_RP, user=user, session=sk, failure=Reason.STORE_ERROR, client_ip=client_ip
                )
                resp = page(
                    503,
                    "Sign-out not completed",
                    "Your session could not be ended just now. Please try again shortly.",
                    back=f"{self.stepup.path_prefix}/logout",
                )
                self._clear(resp)
                return resp
        self._audit(
            VIA_RP, user=user, session=sk, ended=1 if sk is not None else 0, client_ip=client_ip
        )
        resp = web.Response(
            status=303,
            headers={"Location": self._end_session_url(after), "Cache-Control": "no-store"},
        )
        self._clear(resp)
        return resp

    def _end_session_url(self, after: str | None) -> str:
        endpoint = self.metadata.end_session_endpoint if self.metadata is not None else None
        if endpoint is None:  # the IdP offers no RP-initiated logout: the local one is done
            return after or self.stepup.landing_path
        params = {"client_id": self.oidc.client_id}
        if after is not None:
            params["post_logout_redirect_uri"] = after
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(params)}"

    def _clear(self, resp: web.StreamResponse) -> None:
        for name in (self.token_cookie, self.state_cookie):
            resp.del_cookie(name, path="/", secure=self.stepup.cookie_secure, httponly=True)
