"""The step-up endpoints: ``/_stepup/{login,start,callback}``.

Envoy routes ``/_stepup/*`` here with ext_authz disabled on that route (same origin as the
applications, so cookies scope correctly). The round trip:

1. ``start`` (the Check redirected a browser here with a signed link) verifies the
   session's token and the link, stores a one-time ``StepupState`` (nonce, PKCE verifier,
   level, return path, the session and the device/IP the Check saw), binds it to this
   browser with a cookie and redirects to the IdP (``oidc.OidcClient.authorize_url``).
   ``login`` does the same for a first sign-in.
2. ``callback`` consumes the state atomically (once), checks the cookie and RFC 9207
   ``iss``, exchanges the code (PKCE), verifies the ID token, and hands what it proved to
   the one grant rule (``authz.core.grants.grant_for``); the completion is audited before
   the grant is written; then 303 back to the saved same-origin path.

Every refusal answers a page with a reference id (also in the log line) and a way back.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from aiohttp import web

from authz.audit.events import AuditEvent
from authz.audit.mapping import stepup_completed
from authz.audit.sinks import AuditTrail, AuditUnavailable
from authz.check.devices import DeviceResolver, xfcc_certificate
from authz.check.tokens import IdToken, StepupTokens
from authz.config.policy_file import PolicyHolder
from authz.config.settings import Settings
from authz.core.attributes import cookie_values, normalize_host, parse_ip
from authz.core.grants import GrantRefused, Proof, Target, grant_for
from authz.core.ids import new_id
from authz.core.policy import Level, Route
from authz.core.reasons import Reason
from authz.core.session import Evidence, Grant, factor_of, session_key, user_key
from authz.errors import OidcError, RequestError, StoreError, TokenError
from authz.ops.metrics import Metrics
from authz.stepup.link import ContextSigner
from authz.stepup.oidc import RelyingParty, pkce_pair
from authz.stepup.pages import page, why_text
from authz.stepup.state import StateKind, StepupState
from authz.stepup.wayback import WayBack, WayBackSigner
from authz.store.interfaces import StepupStore

log = logging.getLogger("authz.stepup")

LOGIN_LEVEL = "login"  # the level label of a first sign-in (metrics, audit)


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


def _redirect(status: int, location: str) -> web.Response:
    return web.Response(status=status, headers={"Location": location, "Cache-Control": "no-store"})


class StepupApp:
    def __init__(
        self,
        *,
        settings: Settings,
        policy: PolicyHolder,
        tokens: StepupTokens,
        store: StepupStore,
        oidc: RelyingParty | None,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        signer: ContextSigner,
        auditor: AuditTrail | None = None,
        devices: DeviceResolver | None = None,
    ) -> None:
        self.auditor = auditor
        self.signer = signer
        self.devices = devices
        self.s = settings.stepup
        self.oidc_settings = settings.oidc
        self.policy = policy
        self.tokens = tokens
        self.store = store
        # None until the IdP's discovery document is in (authz.stepup.provider): a service
        # started while the IdP was unreachable refuses step-ups with idp-unavailable.
        self.oidc = oidc
        self.metrics = metrics
        self.clock = clock
        self.state_cookie = self.s.cookie(self.s.state_cookie)
        self.wayback = WayBackSigner(signer)
        self.token_cookie = self.s.cookie(self.oidc_settings.token_cookie)

    def add_routes(self, app: web.Application) -> None:
        p = self.s.path_prefix
        app.router.add_get(f"{p}/login", self.login)
        app.router.add_get(f"{p}/start", self.start)
        app.router.add_get(f"{p}/callback", self.callback)

    def build(self) -> web.Application:
        """An application with only the step-up routes (tests; the service adds health)."""
        app = web.Application(client_max_size=64 * 1024)
        self.add_routes(app)
        return app

    # -- helpers --------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock())

    def _refusal(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        reason: Reason,
        level: str,
        back: str | None = None,
        factor: str = "none",
        why: str = "",
        back_label: str = "Try again",
    ) -> web.Response:
        """A refused step: counted, logged with a reference id, and a page showing it."""
        reference = new_id(int(self.clock() * 1000))
        self._completion(level, reason, factor)
        log.warning(
            "step-up refused",
            extra={"decision_id": reference, "reason": reason, "stepup_level": level},
        )
        return page(
            status,
            title,
            detail,
            back=back or self.s.landing_path,
            back_label=back_label,
            reference=reference,
            why=why,
            home=self.s.landing_path,
        )

    def _unavailable(self, *, reason: Reason, level: str, back: str | None = None) -> web.Response:
        return self._refusal(
            503,
            "Temporarily unavailable",
            "The sign-in service could not complete this step. Please try again shortly.",
            reason=reason,
            level=level,
            back=back,
        )

    def _idp_unavailable(self, *, level: str, back: str | None = None) -> web.Response:
        return self._refusal(
            503,
            "Sign-in service not reachable yet",
            "This service has not yet reached the identity provider, so it cannot ask for "
            "a sign-in now. Please try again in a moment.",
            reason=Reason.IDP_UNAVAILABLE,
            level=level,
            back=back,
        )

    def _expired(self, reason: Reason, way: WayBack | None, request: web.Request) -> web.Response:
        """A callback whose state is gone: Back into an old sign-in page, a reload after
        success, a page left open past the state's TTL. With the way back the state
        carried, the page leads to the page the user wanted, where the Check starts the
        step-up again if it is still needed."""
        if way is None:
            return self._refusal(
                400,
                "Sign-in expired",
                "This sign-in page is no longer valid. Start again from the page you wanted.",
                reason=reason,
                level="unknown",
            )
        back = safe_return_path(way.return_path, self.s.landing_path)
        level, route = self._names(way.level, back, request)
        target = f"\u201c{route.title}\u201d" if route is not None and route.title else None
        return self._refusal(
            400,
            "This sign-in page was already used",
            "The sign-in it belonged to is finished or has expired (for example after Back "
            "or a reload). Nothing was lost: continue to the page you wanted, and you will "
            "be asked again only if that page still needs it.",
            reason=reason,
            level="unknown",  # the state is gone: the hint alone does not vouch for it
            back=back,
            back_label=f"Continue to {target}" if target else "Continue",
            why=why_text(level, route),
        )

    def _names(
        self, level_name: str | None, path: str, request: web.Request
    ) -> tuple[Level | None, Route | None]:
        """The level and the route (for their human names) of the page at ``path``."""
        policy = self.policy.current.policy
        level = policy.by_name.get(level_name) if level_name else None
        try:
            host = normalize_host(request.host)
        except RequestError:
            return level, None
        route = policy.route_for(host, "GET", urlsplit(path).path)
        return level, route

    def _identity_token(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip() or None
        values = cookie_values(request.headers.get("Cookie", ""), self.token_cookie)
        return values[0] if len(values) == 1 and values[0] else None

    async def _begin(self, state: StepupState, level: Level | None) -> web.StreamResponse:
        oidc = self.oidc
        if oidc is None:
            return self._idp_unavailable(level=state.level or LOGIN_LEVEL, back=state.return_path)
        state_id = secrets.token_urlsafe(32)
        verifier, challenge = pkce_pair()
        state = dataclasses.replace(
            state, nonce=secrets.token_urlsafe(24), verifier=verifier, issued_at=self._now()
        )
        # The IdP echoes it back: the way to the page wanted, even once the state is gone.
        state_param = self.wayback.seal(state_id, state.return_path, state.level, self._now())
        try:
            await self.store.put_state(state_id, state.to_json(), self.s.state_ttl_s)
        except StoreError:
            self.metrics.redis_errors.labels(op="state").inc()
            return self._unavailable(
                reason=Reason.STORE_ERROR,
                level=state.level or LOGIN_LEVEL,
                back=state.return_path,
            )
        url = oidc.authorize_url(
            state=state_param,
            nonce=state.nonce,
            code_challenge=challenge,
            acr_values=tuple(sorted(level.acr)) if level is not None else (),
            max_age=level.max_age if level is not None else None,
            prompt_login=level is not None,
            login_hint=state.subject,
        )
        resp = _redirect(302, url)
        resp.set_cookie(
            self.state_cookie,
            state_id,
            max_age=self.s.state_ttl_s,
            path="/",
            secure=self.s.cookie_secure,
            httponly=True,
            samesite="Lax",
        )
        return resp

    def _login_state(self, rd: str) -> StepupState:
        return StepupState(StateKind.LOGIN, rd, nonce="-", verifier="-", issued_at=0)

    # -- endpoints ------------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.StreamResponse:
        rd = safe_return_path(request.query.get("rd"), self.s.landing_path)
        return await self._begin(self._login_state(rd), None)

    async def start(self, request: web.Request) -> web.StreamResponse:
        rd = safe_return_path(request.query.get("rd"), self.s.landing_path)
        level = self.policy.current.policy.by_name.get(request.query.get("level", ""))
        if level is None or not level.needs_evidence:
            return self._refusal(
                400,
                "Unknown step-up level",
                "The link you followed is not a valid step-up link.",
                reason=Reason.LEVEL_UNKNOWN,
                level="unknown",
                back=rd,
            )
        token = self._identity_token(request)
        identity = None
        now = self._now()
        if token is not None:
            try:
                identity = await self.tokens.verify_access_token(token, now)
            except TokenError:
                identity = None
        if identity is None:
            return await self._begin(self._login_state(rd), None)
        sk = session_key(identity.issuer, identity.subject, identity.session_id)
        try:
            link = self.signer.verify(request.query.get("ctx", ""), level=level.name, now=now)
        except ValueError:
            return self._refusal(
                400,
                "Step-up link expired",
                "Go back to the page you wanted and try again.",
                reason=Reason.LINK_INVALID,
                level=level.name,
                back=rd,
            )
        if not hmac.compare_digest(link.session_key, sk):
            # A link the Check issued for another session (an attacker's, opened here).
            return self._refusal(
                403,
                "Step-up link not for this session",
                "This step-up link was made for another sign-in. Go back to the page you "
                "wanted and try again from there.",
                reason=Reason.LINK_OTHER_SESSION,
                level=level.name,
                back=rd,
            )
        try:
            first = await self.store.remember_once(
                f"link:{link.nonce}", self.signer.max_age_s + self.oidc_settings.leeway_s
            )
        except StoreError:
            self.metrics.redis_errors.labels(op="state").inc()
            return self._unavailable(reason=Reason.STORE_ERROR, level=level.name, back=rd)
        if not first:
            return self._refusal(
                400,
                "Step-up link already used",
                "Each step-up link works once. Go back to the page you wanted and try again.",
                reason=Reason.LINK_REUSED,
                level=level.name,
                back=rd,
            )
        state = StepupState(
            StateKind.STEPUP,
            rd,
            nonce="-",
            verifier="-",
            issued_at=0,
            level=level.name,
            issuer=identity.issuer,
            subject=identity.subject,
            user_key=user_key(identity.issuer, identity.subject),
            session_key=sk,
            device=link.device,
            ip=link.ip,
        )
        return await self._begin(state, level)

    async def callback(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        state_id, way = self.wayback.open(q.get("state", ""), self._now())
        cookies = cookie_values(request.headers.get("Cookie", ""), self.state_cookie)
        if not state_id or len(cookies) != 1 or not hmac.compare_digest(cookies[0], state_id):
            return self._expired(Reason.STATE_MISMATCH, way, request)
        try:
            raw = await self.store.take_state(state_id)
        except StoreError:
            self.metrics.redis_errors.labels(op="state").inc()
            return self._unavailable(reason=Reason.STORE_ERROR, level="unknown")
        saved = StepupState.from_json(raw) if raw is not None else None
        if saved is None:  # unknown, expired, already used, or not a state we wrote
            return self._expired(Reason.STATE_INVALID, way, request)
        level_name = saved.level or LOGIN_LEVEL
        retry = self._retry_path(saved)
        oidc = self.oidc
        if oidc is None:  # not reachable here: a state from another replica's step-up
            return self._idp_unavailable(level=level_name, back=retry)
        iss = q.get("iss")
        if iss is None and oidc.requires_iss:
            # RFC 9207 section 2.4: the IdP says it always sends `iss`; a response without
            # it came from elsewhere or was altered.
            return self._refusal(
                403,
                "Sign-in refused",
                "The answer did not say which identity provider sent it.",
                reason=Reason.ISS_MISSING,
                level=level_name,
                back=retry,
            )
        if iss is not None and iss != self.oidc_settings.issuer:  # RFC 9207 mix-up defence
            return self._refusal(
                403,
                "Sign-in refused",
                "The answer came from an unexpected identity provider.",
                reason=Reason.ISSUER_MISMATCH,
                level=level_name,
                back=retry,
            )
        if "error" in q or "code" not in q:
            return self._refusal(
                403,
                "Sign-in not completed",
                "The identity provider did not complete the sign-in.",
                reason=Reason.IDP_ERROR,
                level=level_name,
                back=retry,
            )
        try:
            tokens = await oidc.exchange_code(q["code"], saved.verifier)
            now = self._now()
            id_token = await self.tokens.verify_id_token(tokens["id_token"], now, nonce=saved.nonce)
        except (OidcError, TokenError) as exc:
            log.warning("step-up callback refused", extra={"reason": str(exc)})
            return self._refusal(
                403,
                "Sign-in refused",
                "The sign-in could not be verified.",
                reason=Reason.TOKEN_REJECTED,
                level=level_name,
                back=retry,
            )
        if saved.kind is StateKind.LOGIN:
            return await self._finish_login(tokens, saved, now)
        return await self._finish_stepup(id_token, saved, now, request)

    def _retry_path(self, saved: StepupState) -> str:
        """Where "Try again" goes: the page the user wanted (it restarts the step-up)."""
        return saved.return_path

    async def _finish_login(
        self, tokens: dict[str, Any], saved: StepupState, now: int
    ) -> web.StreamResponse:
        access = tokens.get("access_token")
        try:
            identity = await self.tokens.verify_access_token(str(access), now)
        except TokenError:
            return self._refusal(
                403,
                "Sign-in refused",
                "The sign-in could not be verified.",
                reason=Reason.TOKEN_REJECTED,
                level=LOGIN_LEVEL,
                back=saved.return_path,
            )
        self._completion(LOGIN_LEVEL, Reason.SUCCESS, factor_of(identity.evidence.amr))
        resp = _redirect(303, saved.return_path)
        resp.set_cookie(
            self.token_cookie,
            str(access),
            max_age=max(1, identity.expires_at - now),
            path="/",
            secure=self.s.cookie_secure,
            httponly=True,
            samesite="Lax",
        )
        resp.del_cookie(self.state_cookie, path="/")
        return resp

    async def _presented(self, request: web.Request, now: int) -> tuple[str | None, str | None]:
        """(device, client IP) of the browser completing the step-up: its device cookie,
        an MDM assertion or (through Envoy's x-forwarded-client-cert) its certificate;
        the address Envoy saw, from the header the /_stepup/ route sets."""
        ip = parse_ip(request.headers.get(self.s.peer_header, ""))
        client = str(ip) if ip is not None else None
        if self.devices is None:
            return None, client
        headers = {k.lower(): v for k, v in request.headers.items()}
        device = await self.devices.resolve_headers(
            headers,
            now,
            peer_certificate=xfcc_certificate(headers.get("x-forwarded-client-cert", "")),
            client=client or "",
        )
        return (device.id if device is not None else None), client

    async def _finish_stepup(
        self, id_token: IdToken, saved: StepupState, now: int, request: web.Request
    ) -> web.StreamResponse:
        assert saved.level is not None and saved.user_key is not None
        assert saved.session_key is not None and saved.issuer is not None
        assert saved.subject is not None
        level = self.policy.current.policy.by_name.get(saved.level)
        evidence = id_token.evidence
        factor = factor_of(evidence.amr)
        device, ip = await self._presented(request, now)
        new_cookie = None
        cookies = self.devices.cookies if self.devices is not None else None
        if device is None and cookies is not None:
            # No device identity yet: this browser gets a device cookie of ours, and the
            # grant and the "known device" record name it.
            new_cookie, device = cookies.issue()
        # The challenge's device and IP; where the Check saw none, the binding starts with
        # the browser that completes the step-up.
        target = Target(
            saved.issuer,
            saved.subject,
            device=saved.device if saved.device is not None else device,
            ip=saved.ip if saved.ip is not None else ip,
        )
        proof = Proof(
            id_token.issuer,
            id_token.subject,
            evidence,
            challenged_at=saved.issued_at,
            device=device,
            ip=ip,
        )
        try:
            grant = grant_for(
                level,
                target,
                proof,
                now=now,
                leeway=self.oidc_settings.leeway_s,
                default_ttl_s=self.s.default_grant_ttl_s,
            )
        except GrantRefused as exc:
            self._audit_completion(saved, id_token, exc.reason, None, device)
            names = self._names(saved.level, saved.return_path, request)
            return self._refusal(
                403,
                "Step-up not accepted",
                _refusal_text(exc.reason),
                reason=exc.reason,
                level=saved.level,
                back=saved.return_path,
                factor=factor,
                why=why_text(*names),
            )
        if self.auditor is not None:
            # Audit before grant: no grant exists without its durable completion record,
            # which names the device the grant is bound to (a new device cookie's hash).
            try:
                await self.auditor.durable(self._completion_event(saved, id_token, grant))
            except AuditUnavailable:
                return self._unavailable(
                    reason=Reason.AUDIT_UNAVAILABLE, level=saved.level, back=saved.return_path
                )
        try:
            await self.store.write_grant(saved.user_key, saved.session_key, grant, now)
        except (StoreError, ValueError):
            self.metrics.redis_errors.labels(op="write").inc()
            return self._unavailable(
                reason=Reason.STORE_ERROR, level=saved.level, back=saved.return_path
            )
        self._completion(saved.level, Reason.SUCCESS, factor)
        log.info(
            "step-up granted",
            extra={
                "stepup_level": grant.level,
                "acr": evidence.acr,
                "factor": factor,
                "expires_at": grant.expires_at,
            },
        )
        resp = _redirect(303, saved.return_path)
        resp.del_cookie(self.state_cookie, path="/")
        if new_cookie is not None and cookies is not None:
            resp.set_cookie(
                cookies.name,
                new_cookie,
                max_age=400 * 86_400,
                path="/",
                secure=self.s.cookie_secure,
                httponly=True,
                samesite="Lax",
            )
        return resp

    def _completion_event(
        self,
        saved: StepupState,
        id_token: IdToken,
        grant: Grant | None,
        result: Reason = Reason.SUCCESS,
        device: str | None = None,
    ) -> AuditEvent:
        ev: Evidence = id_token.evidence
        return stepup_completed(
            result=result,
            level=saved.level,
            user=f"{id_token.issuer}|{id_token.subject}",
            session=saved.session_key,
            acr=ev.acr,
            amr=ev.amr,
            auth_time=ev.auth_time,
            issuer=id_token.issuer,
            device=grant.device if grant is not None else device,
            client_ip=saved.ip,
            grant_expires_at=grant.expires_at if grant is not None else None,
            policy_version=self.policy.current.version,
        )

    def _audit_completion(
        self,
        saved: StepupState,
        id_token: IdToken,
        result: Reason,
        grant: Grant | None,
        device: str | None,
    ) -> None:
        if self.auditor is not None:
            self.auditor.emit(self._completion_event(saved, id_token, grant, result, device))

    def _completion(self, level: str, result: Reason, factor: str) -> None:
        self.metrics.completions.labels(level=level, result=result, factor=factor).inc()


_REFUSAL_TEXT = {
    Reason.SUBJECT_MISMATCH: "You signed in as a different user than the one who asked for "
    "this step. Sign in again as the same user.",
    Reason.ISSUER_MISMATCH: "The sign-in came from a different identity provider.",
    Reason.ACR_INSUFFICIENT: "The sign-in did not use a strong enough method for this page.",
    Reason.AMR_INSUFFICIENT: "The sign-in did not use a method this page accepts.",
    Reason.AUTH_TOO_OLD: "The sign-in was not fresh enough for this page.",
    Reason.AUTH_TIME_MISSING: "The identity provider did not say when you signed in.",
    Reason.AUTH_TIME_FUTURE: "The identity provider's clock is ahead of ours.",
    Reason.DEVICE_MISMATCH: "The step-up was completed on a different device.",
    Reason.IP_MISMATCH: "The step-up was completed from a different network address.",
}


def _refusal_text(reason: Reason) -> str:
    return _REFUSAL_TEXT.get(reason, "The sign-in did not meet the required strength.")
