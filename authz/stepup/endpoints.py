"""The HTTP port: /_stepup/{login,start,callback}, /healthz, /readyz, /metrics.

Envoy routes ``/_stepup/*`` here with ext_authz disabled on that route (same origin as the
applications, so cookies scope correctly). The round trip (DESIGN.md "The step-up flow"):
``start`` stores a one-time state (nonce, PKCE verifier, level, return path, session key)
and binds it to this browser with a cookie; ``callback`` consumes it atomically, checks the
cookie, exchanges the code, verifies the ID token and records a time-boxed grant.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from authz.audit.mapping import stepup_completed
from authz.audit.sinks import Auditor, AuditUnavailable
from authz.check.devices import cookie_device_id
from authz.config.policy_file import PolicyHolder
from authz.config.settings import Settings
from authz.core.attributes import cookie_values
from authz.core.policy import Level
from authz.core.session import Evidence, Grant, Identity, satisfies, session_key, user_key
from authz.errors import OidcError, StoreError, TokenError
from authz.ops.metrics import Metrics
from authz.stepup.link import ContextSigner
from authz.stepup.oidc import OidcClient, pkce_pair

log = logging.getLogger("authz.http")


class StepupTokens(Protocol):
    async def verify_access_token(self, token: str, now: int) -> Identity: ...
    async def verify_id_token(self, token: str, now: int, *, nonce: str) -> dict[str, Any]: ...


class StepupStore(Protocol):
    async def write_grant(
        self, user: str, session: str, grant: Grant, now: int, *, remember_device: bool = True
    ) -> None: ...
    async def put_state(self, state_id: str, payload: dict[str, Any], ttl_s: int) -> None: ...
    async def take_state(self, state_id: str) -> dict[str, Any] | None: ...
    async def ping(self) -> bool: ...


def safe_return_path(candidate: str | None, landing: str) -> str:
    """A same-origin relative path, or the landing page.

    Refused: anything with a scheme or authority (``https://x``, ``//x``, ``https:x``), a
    backslash (``/\\x`` is ``//x`` to browsers), control characters or whitespace, raw or
    percent-encoded (``/%09/x`` decodes to ``/\\t/x``, which browsers strip to ``//x``).
    """
    if not candidate or not candidate.startswith("/") or len(candidate) > 2048:
        return landing
    for form in (candidate, unquote(candidate)):
        if form.startswith(("//", "/\\")) or "\\" in form:
            return landing
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in form):
            return landing
    parts = urlsplit(candidate)
    if parts.scheme or parts.netloc:
        return landing
    return candidate


class StepupApp:
    def __init__(
        self,
        *,
        settings: Settings,
        policy: PolicyHolder,
        tokens: StepupTokens,
        store: StepupStore,
        oidc: OidcClient,
        metrics: Metrics,
        keys_ready: Callable[[], bool],
        clock: Callable[[], float] = time.time,
        auditor: Auditor | None = None,
        signer: ContextSigner | None = None,
        device_cookie: str | None = "stepup_device",
    ) -> None:
        self.auditor = auditor
        self.signer = signer
        self.device_cookie = device_cookie
        self.s = settings.stepup
        self.oidc_settings = settings.oidc
        self.policy = policy
        self.tokens = tokens
        self.store = store
        self.oidc = oidc
        self.metrics = metrics
        self.keys_ready = keys_ready
        self.clock = clock
        name = self.s.state_cookie
        # A __Host- cookie must be Secure; a plain-http demo drops the prefix.
        self.state_cookie = name if self.s.cookie_secure else name.removeprefix("__Host-")
        self.ready = True

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        p = self.s.path_prefix
        app.router.add_get(f"{p}/login", self.login)
        app.router.add_get(f"{p}/start", self.start)
        app.router.add_get(f"{p}/callback", self.callback)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_endpoint)
        return app

    # -- health ---------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        checks = {
            "accepting": self.ready,
            "store": await self.store.ping(),
            "keys": self.keys_ready(),
            "policy": self.policy.current is not None,
        }
        ok = all(checks.values())
        body = "".join(f"{k}: {'ok' if v else 'FAIL'}\n" for k, v in checks.items())
        return web.Response(status=200 if ok else 503, text=body)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    # -- helpers --------------------------------------------------------------------------

    def _page(self, status: int, title: str, detail: str) -> web.Response:
        body = (
            f"<!doctype html><title>{title}</title><h1>{title}</h1><p>{detail}</p>"
            f'<p><a href="{self.s.landing_path}">Continue</a></p>'
        )
        return web.Response(
            status=status,
            text=body,
            content_type="text/html",
            headers={"Cache-Control": "no-store"},
        )

    def _identity_token(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip() or None
        values = cookie_values(request.headers.get("Cookie", ""), self.oidc_settings.token_cookie)
        return values[0] if len(values) == 1 and values[0] else None

    async def _begin(
        self, payload: dict[str, Any], level: Level | None, login_hint: str | None
    ) -> web.StreamResponse:
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(24)
        verifier, challenge = pkce_pair()
        payload.update(nonce=nonce, verifier=verifier, iat=int(self.clock()))
        try:
            await self.store.put_state(state, payload, self.s.state_ttl_s)
        except StoreError:
            self.metrics.redis_errors.labels(op="state").inc()
            return self._page(503, "Temporarily unavailable", "Please try again shortly.")
        url = self.oidc.authorize_url(
            state=state,
            nonce=nonce,
            code_challenge=challenge,
            acr_values=tuple(sorted(level.acr)) if level is not None else (),
            max_age=level.max_age if level is not None else None,
            prompt_login=level is not None,
            login_hint=login_hint,
        )
        resp = _redirect(302, url)
        resp.set_cookie(
            self.state_cookie,
            state,
            max_age=self.s.state_ttl_s,
            path="/",
            secure=self.s.cookie_secure,
            httponly=True,
            samesite="Lax",
        )
        return resp

    # -- endpoints ------------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.StreamResponse:
        rd = safe_return_path(request.query.get("rd"), self.s.landing_path)
        return await self._begin({"kind": "login", "rd": rd}, None, None)

    async def start(self, request: web.Request) -> web.StreamResponse:
        rd = safe_return_path(request.query.get("rd"), self.s.landing_path)
        level = self.policy.current.policy.by_name.get(request.query.get("level", ""))
        if level is None or not level.needs_evidence:
            return self._page(400, "Unknown step-up level", "The link you followed is invalid.")
        token = self._identity_token(request)
        identity = None
        if token is not None:
            try:
                identity = await self.tokens.verify_access_token(token, int(self.clock()))
            except TokenError:
                identity = None
        if identity is None:
            return await self._begin({"kind": "login", "rd": rd}, None, None)
        device = ip = None
        if self.signer is not None:
            # The device and IP the Check saw, so the grant is bound to them; a link
            # without a valid context is refused rather than bound to nothing.
            try:
                device, ip = self.signer.verify(
                    request.query.get("ctx", ""), level=level.name, now=int(self.clock())
                )
            except ValueError:
                return self._page(
                    400, "Step-up link expired", "Go back to the page you wanted and try again."
                )
        payload = {
            "kind": "stepup",
            "rd": rd,
            "level": level.name,
            "uk": user_key(identity.issuer, identity.subject),
            "sk": session_key(identity.issuer, identity.subject, identity.session_id),
            "sub": identity.subject,
            "device": device,
            "ip": ip,
        }
        return await self._begin(payload, level, identity.subject)

    async def callback(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        state = q.get("state", "")
        cookies = cookie_values(request.headers.get("Cookie", ""), self.state_cookie)
        if not state or len(cookies) != 1 or not hmac.compare_digest(cookies[0], state):
            self._completion("unknown", "state-mismatch", "none")
            return self._page(400, "Sign-in expired", "Start again from the page you wanted.")
        try:
            saved = await self.store.take_state(state)
        except StoreError:
            self.metrics.redis_errors.labels(op="state").inc()
            return self._page(503, "Temporarily unavailable", "Please try again shortly.")
        if saved is None:  # unknown, expired or already used
            self._completion("unknown", "state-invalid", "none")
            return self._page(400, "Sign-in expired", "Start again from the page you wanted.")
        level_name = str(saved.get("level", "login"))
        iss = q.get("iss")
        if iss is not None and iss != self.oidc_settings.issuer:  # RFC 9207 mix-up defence
            self._completion(level_name, "issuer-mismatch", "none")
            return self._page(403, "Sign-in refused", "Unexpected identity provider.")
        if "error" in q or "code" not in q:
            self._completion(level_name, "idp-error", "none")
            return self._page(403, "Sign-in not completed", "The identity provider refused.")
        try:
            tokens = await self.oidc.exchange_code(q["code"], str(saved["verifier"]))
            now = int(self.clock())
            claims = await self.tokens.verify_id_token(
                tokens["id_token"], now, nonce=str(saved["nonce"])
            )
        except (OidcError, TokenError) as exc:
            log.warning("step-up callback refused", extra={"reason": str(exc)})
            self._completion(level_name, "token-rejected", "none")
            return self._page(403, "Sign-in refused", "The sign-in could not be verified.")
        if saved.get("kind") == "login":
            return await self._finish_login(tokens, saved, now)
        return await self._finish_stepup(claims, saved, now)

    async def _finish_login(
        self, tokens: dict[str, Any], saved: dict[str, Any], now: int
    ) -> web.StreamResponse:
        access = tokens.get("access_token")
        try:
            identity = await self.tokens.verify_access_token(str(access), now)
        except TokenError:
            self._completion("login", "token-rejected", "none")
            return self._page(403, "Sign-in refused", "The sign-in could not be verified.")
        self._completion("login", "success", _factor(identity.evidence.amr))
        resp = _redirect(303, str(saved["rd"]))
        resp.set_cookie(
            self.oidc_settings.token_cookie,
            str(access),
            max_age=max(1, identity.expires_at - now),
            path="/",
            secure=self.s.cookie_secure,
            httponly=True,
            samesite="Lax",
        )
        resp.del_cookie(self.state_cookie, path="/")
        return resp

    async def _finish_stepup(
        self, claims: dict[str, Any], saved: dict[str, Any], now: int
    ) -> web.StreamResponse:
        level = self.policy.current.policy.by_name.get(str(saved.get("level")))
        leeway = self.oidc_settings.leeway_s
        acr, amr, auth_time = claims.get("acr"), claims.get("amr") or [], claims.get("auth_time")
        result = "success"
        if level is None:
            result = "level-unknown"
        elif claims.get("sub") != saved.get("sub"):
            result = "subject-mismatch"  # someone else signed in at the IdP
        elif not isinstance(auth_time, int) or isinstance(auth_time, bool):
            result = "auth-time-missing"
        elif auth_time > now + leeway:
            # The grant's lifetime counts from auth_time: one in the future would outlive
            # its TTL (by years, on a level without max_age). Same rule as RecordGrant.
            result = "auth-time-future"
        elif auth_time < int(saved["iat"]) - leeway:
            result = "auth-too-old"  # not a fresh authentication for this challenge
        elif not (
            isinstance(acr, str) and isinstance(amr, list) and all(isinstance(a, str) for a in amr)
        ):
            result = "claims-invalid"
        evidence = Evidence(
            acr if isinstance(acr, str) else None,
            tuple(a for a in amr if isinstance(a, str)),
            auth_time if isinstance(auth_time, int) else None,
        )
        if (
            result == "success"
            and level is not None
            and not satisfies(
                evidence,
                acr=level.acr,
                amr_any=level.amr_any,
                max_age=level.max_age,
                now=now,
                leeway=leeway,
            )
        ):
            result = "acr-insufficient"
        factor = _factor(evidence.amr)
        user = f"{claims.get('iss')}|{claims.get('sub')}"
        ttl = (level.grant_ttl or level.max_age or self.s.default_grant_ttl_s) if level else 0
        audit = stepup_completed(
            result=result,  # "auth-time-missing" already when auth_time is absent
            level=str(saved.get("level")),
            user=user,
            session=str(saved.get("sk")),
            acr=evidence.acr,
            amr=evidence.amr,
            auth_time=evidence.auth_time,
            issuer=str(claims.get("iss")),
            device=saved.get("device"),
            client_ip=saved.get("ip"),
            grant_expires_at=(
                evidence.auth_time + ttl if result == "success" and evidence.auth_time else None
            ),
            policy_version=self.policy.current.version,
        )
        if result != "success" or level is None or evidence.auth_time is None:
            if self.auditor is not None:
                self.auditor.emit(audit)
            self._completion(str(saved.get("level")), result, factor)
            return self._page(
                403, "Step-up not accepted", "The sign-in did not meet the required strength."
            )
        device = saved.get("device")
        new_cookie = None
        if device is None and self.device_cookie:
            # No device identity yet: this browser gets a device cookie, and the grant and
            # the "known device" record name it.
            new_cookie = secrets.token_urlsafe(24)
            device = cookie_device_id(new_cookie)
        grant = Grant(
            level=level.name,
            evidence=evidence,
            expires_at=evidence.auth_time + ttl,
            issued_at=now,
            device=device if isinstance(device, str) else None,
            ip=saved.get("ip") if isinstance(saved.get("ip"), str) else None,
        )
        if self.auditor is not None:
            # Audit before grant: no grant exists without its durable completion record,
            # which names the device the grant is bound to (a new device cookie's hash).
            if device != audit.device and isinstance(device, str):
                audit = dataclasses.replace(audit, device=device)
            try:
                await self.auditor.durable(audit)
            except AuditUnavailable:
                self._completion(level.name, "audit-unavailable", factor)
                return self._page(503, "Temporarily unavailable", "Please try again shortly.")
        try:
            await self.store.write_grant(str(saved["uk"]), str(saved["sk"]), grant, now)
        except (StoreError, ValueError):
            self.metrics.redis_errors.labels(op="write").inc()
            self._completion(level.name, "store-error", factor)
            return self._page(503, "Temporarily unavailable", "Please try again shortly.")
        self._completion(level.name, "success", factor)
        log.info(
            "step-up granted",
            extra={
                "stepup_level": level.name,
                "acr": evidence.acr,
                "factor": factor,
                "expires_at": grant.expires_at,
            },
        )
        resp = _redirect(303, str(saved["rd"]))
        resp.del_cookie(self.state_cookie, path="/")
        if new_cookie is not None and self.device_cookie:
            resp.set_cookie(
                self.device_cookie,
                new_cookie,
                max_age=400 * 86_400,
                path="/",
                secure=self.s.cookie_secure,
                httponly=True,
                samesite="Lax",
            )
        return resp

    def _completion(self, level: str, result: str, factor: str) -> None:
        self.metrics.completions.labels(level=level, result=result, factor=factor).inc()


def _redirect(status: int, location: str) -> web.Response:
    return web.Response(status=status, headers={"Location": location, "Cache-Control": "no-store"})


_FACTORS = ("hwk", "fido", "swk", "otp", "sms", "pwd")


def _factor(amr: tuple[str, ...] | list[str]) -> str:
    """The strongest factor named in ``amr`` (RFC 8176 values), as a bounded label."""
    for f in _FACTORS:
        if f in amr:
            return f
    return "other" if amr else "none"
