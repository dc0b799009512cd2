"""The development OIDC provider as an aiohttp application.

Authorization code flow with PKCE S256 (RFC 7636) and a TOTP second factor (RFC 6238), an SSO
session cookie, discovery (OIDC Discovery 1.0), a JWKS, and RFC 9207 ``iss`` on every
authorization response. State lives in memory: one process, development only.
The stepup-authz service never imports this package.
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from authz.devidp import forms, misbehave
from authz.devidp.config import DevIdpConfig, SigningKey
from authz.devidp.logout import Logout
from authz.devidp.tokens import (
    MFA_ACRS,
    Authentication,
    CodeGrant,
    TokenEndpoint,
    check_password,
    check_totp,
    new_sid,
)
from authz.errors import ConfigError

log = logging.getLogger("authz.devidp")

SESSION_COOKIE = "devidp_session"
_CLAIMS = [
    "iss",
    "sub",
    "aud",
    "exp",
    "iat",
    "auth_time",
    "nonce",
    "acr",
    "amr",
    "sid",
    "azp",
    "at_hash",
    "name",
    "email",
]


@dataclass
class _Pending:
    """An authorization request waiting for the user to sign in; only its id goes to the
    browser, so redirect URI, PKCE challenge and nonce cannot be altered in the form."""

    client_id: str
    redirect_uri: str
    scope: str
    state: str | None
    nonce: str | None
    code_challenge: str
    login_hint: str
    need_otp: bool
    expires_at: float
    attempts: int = 0
    # A step-up for the user already signed in here: only the second factor is asked.
    second_factor_of: str | None = None
    why: str = ""  # what the form says about why it asks what it asks


@dataclass(frozen=True)
class _Session:
    auth: Authentication
    expires_at: float


@dataclass
class _Request:
    """The validated parameters of one ``GET /authorize``."""

    client_id: str
    redirect_uri: str
    state: str | None
    params: dict[str, str] = field(default_factory=dict)


class _Redirect(Exception):
    """An error that RFC 6749 section 4.1.2.1 says goes back to the (verified) client."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(error)
        self.error = error
        self.description = description


class Provider:
    """Request handlers and the in-memory state they share."""

    def __init__(self, config: DevIdpConfig) -> None:
        self.config = config
        self.key = SigningKey.load_or_generate(config.signing_key_path)
        # TEST-ONLY: one mutable set of knobs, shared with the token endpoint.
        self.knobs = config.misbehave
        self.tokens = TokenEndpoint(config, self.key, self.knobs)
        if self.knobs.active or config.test_knobs:
            log.warning(
                "DEV IdP MISBEHAVES ON PURPOSE (test knobs: %s, run-time changes %s)",
                self.knobs,
                "allowed" if config.test_knobs else "off",
            )
        self._pending: dict[str, _Pending] = {}
        self._sessions: dict[str, _Session] = {}
        parts = urlsplit(config.issuer)
        self._cookie_path = parts.path.rstrip("/") or "/"
        self._cookie_secure = parts.scheme == "https"

    # -- discovery -----------------------------------------------------------------------

    async def discovery(self, _: web.Request) -> web.Response:
        c = self.config
        return web.json_response(
            {
                "issuer": c.issuer,
                "authorization_endpoint": c.endpoint("/authorize"),
                "token_endpoint": c.endpoint("/token"),
                "jwks_uri": c.endpoint("/jwks"),
                "response_types_supported": ["code"],
                "response_modes_supported": ["query"],
                "grant_types_supported": ["authorization_code", "password"],
                "subject_types_supported": ["public"],
                "code_challenge_methods_supported": ["S256"],
                "acr_values_supported": ["pwd", "mfa"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                ],
                "scopes_supported": ["openid", "profile", "email"],
                "claims_supported": list(_CLAIMS),
                "prompt_values_supported": ["none", "login"],
                "authorization_response_iss_parameter_supported": True,
                "end_session_endpoint": c.endpoint("/logout"),
                "backchannel_logout_supported": True,
                "backchannel_logout_session_supported": True,
            }
        )

    async def jwks(self, _: web.Request) -> web.Response:
        return web.json_response({"keys": [dict(self.key.public_jwk)]})

    # -- authorization endpoint ------------------------------------------------------------

    async def authorize_get(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        client = self.config.clients.get(q.get("client_id", ""))
        redirect_uri = q.get("redirect_uri", "")
        if client is None:
            return forms.error_page("Unknown client_id.")
        if redirect_uri not in client.redirect_uris:
            return forms.error_page("redirect_uri is not registered for this client.")
        req = _Request(q["client_id"], redirect_uri, q.get("state"), dict(q))
        try:
            return self._authorize(request, req)
        except _Redirect as exc:
            log.info("authorize refused client=%s error=%s", req.client_id, exc.error)
            return self._redirect(req, {"error": exc.error, "error_description": exc.description})

    def _authorize(self, request: web.Request, req: _Request) -> web.StreamResponse:
        p = req.params
        if p.get("response_type") != "code":
            raise _Redirect("unsupported_response_type", "only response_type=code")
        scope = p.get("scope", "")
        if "openid" not in scope.split():
            raise _Redirect("invalid_request", "scope must include openid")
        challenge = p.get("code_challenge", "")
        if p.get("code_challenge_method") != "S256" or not 43 <= len(challenge) <= 128:
            raise _Redirect("invalid_request", "PKCE with code_challenge_method=S256 required")
        max_age: int | None = None
        if "max_age" in p:
            if not p["max_age"].isdigit():
                raise _Redirect("invalid_request", "max_age must be a non-negative integer")
            max_age = int(p["max_age"])
        prompt = set(p.get("prompt", "").split())
        if "none" in prompt and len(prompt) > 1:
            raise _Redirect("invalid_request", "prompt=none cannot be combined")  # OIDC 3.1.2.1
        acr_values = tuple(p.get("acr_values", "").split())
        login_hint = p.get("login_hint", "")
        now = self.config.clock()

        session = self._session(request)
        if session is not None and "login" not in prompt:
            auth = session.auth
            fresh = max_age is None or now - auth.auth_time <= max_age
            acr_ok = not acr_values or auth.acr in acr_values
            hint_ok = not login_hint or login_hint == auth.user
            if fresh and acr_ok and hint_ok:
                log.info("authorize via sso client=%s user=%s", req.client_id, auth.user)
                return self._issue(req, scope, challenge, p.get("nonce"), auth)
        if "none" in prompt:
            raise _Redirect("login_required", "no session satisfies the request")

        self._purge(now)
        need_otp = bool(MFA_ACRS.intersection(acr_values))
        second_factor_of, why = self._what_to_ask(session, need_otp, login_hint, max_age, now)
        pending = _Pending(
            client_id=req.client_id,
            redirect_uri=req.redirect_uri,
            scope=scope,
            state=req.state,
            nonce=p.get("nonce"),
            code_challenge=challenge,
            login_hint=login_hint or (session.auth.user if session else ""),
            need_otp=need_otp,
            expires_at=now + self.config.login_ttl_s,
            second_factor_of=second_factor_of,
            why=why,
        )
        request_id = secrets.token_urlsafe(32)
        self._pending[request_id] = pending
        return self._form(request_id, pending, pending.login_hint)

    def _form(
        self, request_id: str, pending: _Pending, username: str, error: str = "", status: int = 200
    ) -> web.Response:
        if pending.second_factor_of is not None:
            return forms.second_factor_form(
                request_id=request_id,
                client_id=pending.client_id,
                username=pending.second_factor_of,
                why=pending.why,
                error=error,
                status=status,
            )
        return forms.login_form(
            request_id=request_id,
            client_id=pending.client_id,
            username=username,
            need_otp=pending.need_otp,
            why=pending.why,
            error=error,
            status=status,
        )

    def _what_to_ask(
        self,
        session: _Session | None,
        need_otp: bool,
        login_hint: str,
        max_age: int | None,
        now: float,
    ) -> tuple[str | None, str]:
        """(the user whose second factor alone is asked, or None; why the form asks what
        it asks). Only the second factor when this browser is signed in here as the user
        the application names and that sign-in is within the application's max_age;
        otherwise the form says why the password is asked again."""
        if not need_otp:
            return None, ""
        asks = "The application asks for a second factor for this page."
        if session is None:
            return None, f"{asks} You are not signed in here: enter your password and a code."
        user = session.auth.user
        if login_hint and login_hint != user:
            return None, (
                f"{asks} You are signed in here as {user}, but the application asks for "
                f"{login_hint}: sign in as {login_hint}."
            )
        if max_age is not None and now - session.auth.auth_time > max_age:
            minutes = max(1, max_age // 60)
            return None, (
                f"{asks} Your sign-in here is older than the {minutes} minutes it allows, "
                "so your password is asked again too."
            )
        return user, f"{asks} You are signed in as {user}: enter the code from your app."

    async def authorize_post(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        request_id = fields.get("request_id", "")
        now = self.config.clock()
        pending = self._pending.get(request_id)
        if pending is None or pending.expires_at <= now:
            self._pending.pop(request_id, None)
            return forms.error_page(
                "This sign-in request is unknown or has expired. Start again from the application."
            )
        if fields.get("action") == "cancel":
            # The user declined: OIDC Core 3.1.2.6 `access_denied`, back to the client.
            del self._pending[request_id]
            log.info("sign-in cancelled client=%s", pending.client_id)
            req = _Request(pending.client_id, pending.redirect_uri, pending.state)
            return self._redirect(
                req, {"error": "access_denied", "error_description": "the user cancelled"}
            )
        if pending.second_factor_of is not None and "password" not in fields:
            return self._second_factor(request, request_id, pending, fields.get("otp", ""), now)
        username = fields.get("username", "")
        otp = fields.get("otp", "")
        ok = check_password(self.config.users, username, fields.get("password", ""))
        otp_ok = False
        if ok and (otp or pending.need_otp):
            otp_ok = check_totp(self.config.users[username], otp, now)
            ok = otp_ok
        if not ok:
            pending.attempts += 1
            log.info("sign-in failed user=%s attempt=%d", username, pending.attempts)
            if pending.attempts >= self.config.max_login_attempts:
                del self._pending[request_id]
                return forms.error_page(
                    "Too many failed attempts. Start again from the application.", status=401
                )
            return self._form(
                request_id, pending, username, "Invalid username, password or code.", 401
            )
        del self._pending[request_id]
        previous = self._session(request)
        same_user = previous is not None and previous.auth.user == username
        auth = Authentication(
            user=username,
            sid=previous.auth.sid if previous is not None and same_user else new_sid(),
            auth_time=int(now),
            acr="mfa" if otp_ok else "pwd",
            amr=("pwd", "otp") if otp_ok else ("pwd",),
        )
        log.info("sign-in ok user=%s acr=%s", username, auth.acr)
        req = _Request(pending.client_id, pending.redirect_uri, pending.state)
        response = self._issue(req, pending.scope, pending.code_challenge, pending.nonce, auth)
        # A fresh cookie value on every sign-in (no session fixation); the sid may survive.
        old_cookie = request.cookies.get(SESSION_COOKIE)
        if old_cookie:
            self._sessions.pop(old_cookie, None)
        cookie = secrets.token_urlsafe(32)
        self._sessions[cookie] = _Session(auth, now + self.config.session_ttl_s)
        response.set_cookie(
            SESSION_COOKIE,
            cookie,
            path=self._cookie_path,
            httponly=True,
            samesite="Lax",
            secure=self._cookie_secure,
        )
        return response

    def _second_factor(
        self, request: web.Request, request_id: str, pending: _Pending, otp: str, now: float
    ) -> web.StreamResponse:
        """The step-up of the user signed in here: their code alone. The session must still
        be theirs (not signed out, not another user's since the form was shown)."""
        session = self._session(request)
        user = pending.second_factor_of
        assert user is not None
        if session is None or session.auth.user != user:
            del self._pending[request_id]
            return forms.error_page(
                "Your sign-in here changed while this page was open. Start again from the "
                "application.",
                status=401,
            )
        if not check_totp(self.config.users[user], otp, now):
            pending.attempts += 1
            log.info("second factor failed user=%s attempt=%d", user, pending.attempts)
            if pending.attempts >= self.config.max_login_attempts:
                del self._pending[request_id]
                return forms.error_page(
                    "Too many failed attempts. Start again from the application.", status=401
                )
            return self._form(request_id, pending, user, "Invalid code.", 401)
        del self._pending[request_id]
        # The password of this session and the code now: both factors, the newest now.
        auth = Authentication(
            user=user, sid=session.auth.sid, auth_time=int(now), acr="mfa", amr=("pwd", "otp")
        )
        log.info("second factor ok user=%s", user)
        req = _Request(pending.client_id, pending.redirect_uri, pending.state)
        response = self._issue(req, pending.scope, pending.code_challenge, pending.nonce, auth)
        cookie = request.cookies.get(SESSION_COOKIE, "")
        self._sessions[cookie] = _Session(auth, session.expires_at)
        return response

    # -- helpers ---------------------------------------------------------------------------

    def end_session(self, request: web.Request) -> Authentication | None:
        """Forget the browser's SSO session; what it was, if it was live."""
        cookie = request.cookies.get(SESSION_COOKIE)
        session = self._session(request)
        if cookie:
            self._sessions.pop(cookie, None)
        return session.auth if session is not None else None

    def _session(self, request: web.Request) -> _Session | None:
        cookie = request.cookies.get(SESSION_COOKIE)
        session = self._sessions.get(cookie) if cookie else None
        if session is None or session.expires_at <= self.config.clock():
            return None
        return session

    def _issue(
        self, req: _Request, scope: str, challenge: str, nonce: str | None, auth: Authentication
    ) -> web.StreamResponse:
        grant = CodeGrant(
            client_id=req.client_id,
            redirect_uri=req.redirect_uri,
            code_challenge=challenge,
            scope=scope,
            nonce=nonce,
            auth=auth,
            expires_at=self.config.clock() + self.config.code_ttl_s,
        )
        return self._redirect(req, {"code": self.tokens.issue_code(grant)})

    def _redirect(self, req: _Request, params: dict[str, str]) -> web.StreamResponse:
        if req.state is not None:
            params["state"] = req.state
        params["iss"] = self.knobs.response_iss or self.config.issuer  # RFC 9207 section 2
        sep = "&" if "?" in req.redirect_uri else "?"
        location = req.redirect_uri + sep + urlencode(params)
        return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})

    async def set_misbehaviour(self, request: web.Request) -> web.Response:
        """TEST-ONLY ``PUT /_test/misbehave``: replace every knob (``{}`` = honest again)."""
        try:
            new = misbehave.parse(await request.json())
        except (ValueError, ConfigError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        for f in dataclass_fields(new):
            setattr(self.knobs, f.name, getattr(new, f.name))
        log.warning("test knobs now %s", self.knobs)
        return web.json_response(asdict(self.knobs))

    def _purge(self, now: float) -> None:
        for rid in [r for r, p in self._pending.items() if p.expires_at <= now]:
            del self._pending[rid]
        for cid in [c for c, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[cid]


PROVIDER_KEY = web.AppKey("devidp_provider", Provider)


def create_app(config: DevIdpConfig) -> web.Application:
    """Build the provider. A signing key is generated here unless the config names a PEM."""
    provider = Provider(config)
    app = web.Application()
    app[PROVIDER_KEY] = provider
    prefix = urlsplit(config.issuer).path.rstrip("/")
    app.router.add_get(prefix + "/.well-known/openid-configuration", provider.discovery)
    app.router.add_get(prefix + "/jwks", provider.jwks)
    app.router.add_get(prefix + "/authorize", provider.authorize_get)
    app.router.add_post(prefix + "/authorize", provider.authorize_post)
    app.router.add_post(prefix + "/token", provider.tokens.handle)
    logout = Logout(config, provider.tokens.sign, provider.end_session, cookie=SESSION_COOKIE)
    app.router.add_get(prefix + "/logout", logout.confirm)
    app.router.add_post(prefix + "/logout", logout.logout)
    if config.test_knobs:  # TEST-ONLY, off unless `serve --test-knobs`
        app.router.add_put(prefix + "/_test/misbehave", provider.set_misbehaviour)
    return app


class AccessLogger(AbstractAccessLogger):
    """Method, path and status only: query strings carry state, nonce and login hints, and
    redirect locations carry codes, so neither is logged."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %.1fms", request.method, request.path, response.status, time * 1000
        )


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """Bind the listening socket first, so a port-0 caller knows its URL (and so its issuer)
    before the app is created."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@asynccontextmanager
async def running(config: DevIdpConfig, sock: socket.socket) -> AsyncIterator[web.AppRunner]:
    """Serve the provider on an already bound socket until the block exits."""
    runner = web.AppRunner(create_app(config), access_log_class=AccessLogger)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield runner
    finally:
        await runner.cleanup()


__all__ = ["AccessLogger", "Provider", "base_url", "bind", "create_app", "running"]
