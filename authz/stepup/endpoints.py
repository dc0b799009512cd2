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

Every refusal answers a page with a reference id and a way back; the same id is the
decision id of its one JSON log line and of its one audit record (``_refusal``). Audited,
once each: ``stepup.started`` when ``start`` sends the user to the IdP, ``login.completed``
(success or failure) for a first sign-in's callback, ``stepup.completed`` (durable, before
the grant) or ``stepup.failed`` with the precise refusal for a step-up's, and
``stepup.cancelled`` from ``/_stepup/cancel``. docs/audit.md lists the reasons.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from aiohttp import web

from authz.audit import mapping
from authz.audit.events import AuditEvent
from authz.audit.mapping import stepup_completed
from authz.audit.sinks import AuditTrail, AuditUnavailable
from authz.check.devices import DeviceResolver
from authz.check.tokens import IdToken, StepupTokens
from authz.config.policy_file import PolicyHolder
from authz.config.settings import Settings
from authz.core.attributes import cookie_values, normalize_host
from authz.core.grants import GrantRefused, Proof, Target, grant_for
from authz.core.ids import new_id
from authz.core.policy import Level, Route
from authz.core.reasons import Reason
from authz.core.session import Evidence, Grant, factor_of, session_key, user_key
from authz.errors import KeysUnavailable, OidcError, RequestError, StoreError, TokenError
from authz.ops.metrics import Metrics
from authz.stepup.link import ContextSigner
from authz.stepup.oidc import RelyingParty, pkce_pair
from authz.stepup.pages import page, why_text
from authz.stepup.presented import client_address, presented
from authz.stepup.state import StateKind, StepupState
from authz.stepup.wayback import WayBack, WayBackSigner
from authz.store.interfaces import StepupStore

log = logging.getLogger("authz.stepup")

LOGIN_LEVEL = "login"  # the level label of a first sign-in (metrics, audit)
_STATE_ID_CONTEXT = b"stepup-authz state id v1"
_IDP_ERROR_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz_0123456789")


@dataclasses.dataclass(slots=True)
class _Audit:
    """What the audit record of one request knows so far (filled in as the flow learns it):
    ``kind`` None while it is not known whether the callback ends a sign-in or a step-up."""

    kind: StateKind | None = None
    level: str | None = None
    user: str | None = None
    session: str | None = None
    device: str | None = None
    ip: str | None = None
    route: str | None = None
    issuer: str | None = None
    evidence: Evidence | None = None
    proved_user: str | None = None
    idp_error: str | None = None
    error: str | None = None

    def know(self, saved: StepupState) -> None:
        self.kind = saved.kind
        if saved.kind is StateKind.STEPUP:
            self.level = saved.level
            self.user = f"{saved.issuer}|{saved.subject}"
            self.session, self.device, self.ip = saved.session_key, saved.device, saved.ip


def _idp_error(value: str) -> str:
    """The IdP's ``error`` code as recorded: RFC 6749 codes are ``[a-z_]``; anything else is
    cut and replaced, never copied (it is attacker-controlled text)."""
    text = value[:64]
    return text if text and set(text) <= _IDP_ERROR_CHARS else "(not an error code)"


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
        app.router.add_get(f"{p}/cancel", self.cancel)

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
        audit: _Audit | None = None,
        precise: Reason | None = None,
        why: str = "",
        back_label: str = "Try again",
    ) -> web.Response:
        """A refused step: counted (``reason``, the metric's coarse slug), one JSON log line
        and one audit record with the precise reason (``precise``, default ``reason``) under
        the reference id the page shows. The only place a refusal is logged or audited."""
        reference = new_id(int(self.clock() * 1000))
        slug = precise or reason
        self._completion(level, reason, factor)
        log.warning(
            "step-up refused",
            extra={
                "decision_id": reference,
                "reason": slug,
                "result": reason,
                "stepup_level": level,
                "status": status,
                "error": audit.error if audit is not None else None,
                "idp_error": audit.idp_error if audit is not None else None,
            },
        )
        self._audit_refusal(reference, slug, level, audit or _Audit())
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

    def _audit_refusal(self, reference: str, why: Reason, level: str, a: _Audit) -> None:
        if self.auditor is None:
            return
        ev = a.evidence
        # What a refused sign-in's record and a refused step-up's record both carry.
        common: dict[str, Any] = {
            "user": a.user,
            "session": a.session,
            "issuer": a.issuer,
            "acr": ev.acr if ev is not None else None,
            "amr": ev.amr if ev is not None else (),
            "auth_time": ev.auth_time if ev is not None else None,
            "client_ip": a.ip,
            "device": a.device,
            "decision_id": reference,
            "idp_error": a.idp_error,
            "error": a.error,
            "ts_ms": int(self.clock() * 1000),
        }
        if a.kind is StateKind.LOGIN or (a.kind is None and level == LOGIN_LEVEL):
            event = mapping.login_completed(failure=why, **common)
        else:
            event = mapping.stepup_failed(
                reason=why,
                level=a.level or level,
                policy_version=self.policy.current.version,
                proved_user=a.proved_user,
                route=a.route,
                **common,
            )
        self.auditor.emit(event)

    def _unavailable(
        self, *, reason: Reason, level: str, back: str | None = None, audit: _Audit | None = None
    ) -> web.Response:
        return self._refusal(
            503,
            "Temporarily unavailable",
            "The sign-in service could not complete this step. Please try again shortly.",
            reason=reason,
            level=level,
            back=back,
            audit=audit,
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

    def _expired(
        self,
        reason: Reason,
        precise: Reason,
        audit: _Audit,
        way: WayBack | None,
        request: web.Request,
    ) -> web.Response:
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
                audit=audit,
                precise=precise,
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
            audit=audit,
            precise=precise,
        )

    # -- the state id: what a refusal can say about a state it no longer finds ----------------

    def _state_mac(self, body: str) -> str:
        key = self.signer.derived_key(_STATE_ID_CONTEXT)
        mac = hmac.new(key, body.encode(), hashlib.sha256).digest()[:12]
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")

    def _new_state_id(self, kind: StateKind, issued_at: int) -> str:
        """``<random>~<kind><issued_at base 16>~<mac>``: the random part is the secret; the
        rest (MAC'd, so not forgeable) lets a refused callback tell an expired state, and a
        sign-in's from a step-up's, after the store has forgotten it. ``~`` (not in base64url
        and not a dot): the OIDC ``state`` parameter seals this id with the way back, dot
        separated (authz.stepup.wayback)."""
        body = f"{secrets.token_urlsafe(32)}~{kind.value[0]}{issued_at:x}"
        return f"{body}~{self._state_mac(body)}"

    def _state_meta(self, state_id: str) -> tuple[StateKind, int] | None:
        body, _, mac = state_id.rpartition("~")
        _, _, meta = body.partition("~")
        if not (body and mac and meta) or not hmac.compare_digest(mac, self._state_mac(body)):
            return None
        kinds = {k.value[0]: k for k in StateKind}
        try:
            return kinds[meta[0]], int(meta[1:], 16)
        except (KeyError, ValueError):
            return None

    def _used_key(self, state_id: str) -> str:
        return "state-used:" + hashlib.sha256(state_id.encode()).hexdigest()[:40]

    async def _was_used(self, state_id: str) -> bool:
        """Whether a callback already consumed this state (best effort: a store error is
        "not known to be used"; the refusal stands either way). Remembers the state id as
        seen, so the same callback presented again reads as the replay it is."""
        try:
            return not await self.store.remember_once(
                self._used_key(state_id), self.s.state_ttl_s + self.oidc_settings.leeway_s
            )
        except StoreError:
            return False

    async def _lost_state(
        self, state_id: str, meta: tuple[StateKind, int] | None, otherwise: Reason
    ) -> Reason:
        """Why a callback's state cannot be used, for its record: a replay, a state issued
        here and past its TTL, or ``otherwise``. Only the label: the refusal is the same."""
        if await self._was_used(state_id):
            return Reason.STATE_REPLAYED
        if meta is not None and self._now() >= meta[1] + self.s.state_ttl_s:
            return Reason.STATE_EXPIRED
        return otherwise

    def _idp_says(self, q: Any, audit: _Audit) -> Reason | None:
        if "error" in q:
            audit.idp_error = _idp_error(q.get("error", ""))
            return Reason.IDP_ERROR
        if "code" not in q:
            audit.error = "no code in the answer"
            return Reason.IDP_ERROR
        return None

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

    async def _begin(
        self, state: StepupState, level: Level | None, audit: _Audit | None = None
    ) -> web.StreamResponse:
        oidc = self.oidc
        if oidc is None:
            return self._idp_unavailable(level=state.level or LOGIN_LEVEL, back=state.return_path)
        now = self._now()
        state_id = self._new_state_id(state.kind, now)
        verifier, challenge = pkce_pair()
        state = dataclasses.replace(
            state, nonce=secrets.token_urlsafe(24), verifier=verifier, issued_at=now
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
                audit=audit or _Audit(kind=state.kind),
            )
        url = oidc.authorize_url(
            state=state_param,
            nonce=state.nonce,
            code_challenge=challenge,
            acr_values=tuple(sorted(level.acr)) if level is not None else (),
            max_age=level.max_age if level is not None else None,
            prompt_login=level is not None,
            login_hint=state.subject,
            amr_any=level.amr_any if level is not None else frozenset(),
        )
        if level is not None and self.auditor is not None and state.subject is not None:
            self.auditor.emit(
                mapping.stepup_started(
                    level=level.name,
                    user=f"{state.issuer}|{state.subject}",
                    session=state.session_key,
                    acr_values=tuple(sorted(level.acr)),
                    max_age=level.max_age,
                    client_ip=state.ip,
                    device=state.device,
                    route=audit.route if audit is not None else None,
                    policy_version=self.policy.current.version,
                    ts_ms=int(self.clock() * 1000),
                )
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
                audit=_Audit(kind=StateKind.STEPUP),
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
        audit = _Audit(kind=StateKind.STEPUP, level=level.name, user=identity.user, session=sk)
        try:
            link = self.signer.verify(request.query.get("ctx", ""), level=level.name, now=now)
        except ValueError as exc:
            audit.error = str(exc)
            return self._refusal(
                400,
                "Step-up link expired",
                "Go back to the page you wanted and try again.",
                reason=Reason.LINK_INVALID,
                level=level.name,
                back=rd,
                audit=audit,
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
                audit=audit,
            )
        audit.device, audit.ip = link.device, link.ip
        try:
            first = await self.store.remember_once(
                f"link:{link.nonce}", self.signer.max_age_s + self.oidc_settings.leeway_s
            )
        except StoreError:
            self.metrics.redis_errors.labels(op="state").inc()
            return self._unavailable(
                reason=Reason.STORE_ERROR, level=level.name, back=rd, audit=audit
            )
        if not first:
            return self._refusal(
                400,
                "Step-up link already used",
                "Each step-up link works once. Go back to the page you wanted and try again.",
                reason=Reason.LINK_REUSED,
                level=level.name,
                back=rd,
                audit=audit,
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
        return await self._begin(state, level, audit)

    async def callback(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        state_id, way = self.wayback.open(q.get("state", ""), self._now())
        audit = _Audit()
        cookies = cookie_values(request.headers.get("Cookie", ""), self.state_cookie)
        if not state_id:
            return self._expired(Reason.STATE_MISMATCH, Reason.STATE_MISSING, audit, way, request)
        meta = self._state_meta(state_id)
        if meta is not None:
            audit.kind = meta[0]
        if len(cookies) != 1 or not hmac.compare_digest(cookies[0], state_id):
            # Not this browser's state; or its own, already used (Back, reload: the
            # successful callback removed the cookie), or expired with its cookie.
            foreign = Reason.COOKIE_MISMATCH if meta is not None else Reason.STATE_INVALID
            why = await self._lost_state(state_id, meta, foreign)
            return self._expired(Reason.STATE_MISMATCH, why, audit, way, request)
        try:
            raw = await self.store.take_state(state_id)
        except StoreError:
            self.metrics.redis_errors.labels(op="state").inc()
            return self._unavailable(reason=Reason.STORE_ERROR, level="unknown", audit=audit)
        if raw is None:  # unknown, expired, already used
            missing = Reason.STATE_MISSING if meta is not None else Reason.STATE_INVALID
            why = await self._lost_state(state_id, meta, missing)
            return self._expired(Reason.STATE_INVALID, why, audit, way, request)
        await self._was_used(state_id)  # consumed: from now on this id is a replay
        saved = StepupState.from_json(raw)
        if saved is None:  # not a state we wrote
            return self._expired(Reason.STATE_INVALID, Reason.STATE_INVALID, audit, way, request)
        audit.know(saved)
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
                audit=audit,
            )
        if iss is not None and iss != self.oidc_settings.issuer:  # RFC 9207 mix-up defence
            audit.error = "the answer's iss is not the configured issuer"
            return self._refusal(
                403,
                "Sign-in refused",
                "The answer came from an unexpected identity provider.",
                reason=Reason.ISSUER_MISMATCH,
                level=level_name,
                back=retry,
                audit=audit,
            )
        if self._idp_says(q, audit) is not None:
            return self._refusal(
                403,
                "Sign-in not completed",
                "The identity provider did not complete the sign-in.",
                reason=Reason.IDP_ERROR,
                level=level_name,
                back=retry,
                audit=audit,
            )
        precise = Reason.CODE_EXCHANGE_FAILED
        try:
            tokens = await oidc.exchange_code(q["code"], saved.verifier)
            now = self._now()
            precise = Reason.ID_TOKEN_REJECTED
            id_token = await self.tokens.verify_id_token(tokens["id_token"], now, nonce=saved.nonce)
        except (OidcError, TokenError) as exc:
            audit.error = str(exc)
            if isinstance(exc, OidcError):
                precise = exc.reason
            elif isinstance(exc, KeysUnavailable):
                precise = Reason.KEYS_UNAVAILABLE
            return self._refusal(
                403,
                "Sign-in refused",
                "The sign-in could not be verified.",
                reason=Reason.TOKEN_REJECTED,
                level=level_name,
                back=retry,
                audit=audit,
                precise=precise,
            )
        audit.issuer, audit.evidence = id_token.issuer, id_token.evidence
        proved = f"{id_token.issuer}|{id_token.subject}"
        if saved.kind is StateKind.LOGIN:
            audit.user = proved
            audit.ip = client_address(request, self.s.peer_header)
            return await self._finish_login(tokens, saved, now, audit)
        if proved != audit.user:
            audit.proved_user = proved
        return await self._finish_stepup(id_token, saved, now, request, audit)

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """``/_stepup/cancel``: the user gives up the sign-in or step-up this browser has
        pending. Its state is consumed (the IdP's answer can no longer complete it), the
        cancellation is audited once, and the browser goes to the landing page. Nothing
        pending (no cookie, a state already used or expired): nothing to cancel or record."""
        resp = _redirect(303, self.s.landing_path)
        resp.del_cookie(self.state_cookie, path="/")
        cookies = cookie_values(request.headers.get("Cookie", ""), self.state_cookie)
        if len(cookies) != 1 or not cookies[0]:
            return resp
        state_id = cookies[0]
        meta = self._state_meta(state_id)
        try:
            raw = await self.store.take_state(state_id)
        except StoreError:
            self.metrics.redis_errors.labels(op="state").inc()
            audit = _Audit(kind=meta[0] if meta is not None else None)
            return self._unavailable(reason=Reason.STORE_ERROR, level="unknown", audit=audit)
        saved = StepupState.from_json(raw) if raw is not None else None
        if saved is None:
            return resp
        await self._was_used(state_id)
        level = saved.level or LOGIN_LEVEL
        self._completion(level, Reason.USER_CANCELLED, "none")
        ip = saved.ip or client_address(request, self.s.peer_header)
        log.info("step-up cancelled", extra={"stepup_level": level})
        if self.auditor is None:
            return resp
        now_ms = int(self.clock() * 1000)
        if saved.kind is StateKind.STEPUP:
            event = mapping.stepup_cancelled(
                level=level,
                user=f"{saved.issuer}|{saved.subject}",
                session=saved.session_key,
                reason=Reason.USER_CANCELLED,
                client_ip=ip,
                device=saved.device,
                ts_ms=now_ms,
            )
        else:
            event = mapping.login_completed(
                failure=Reason.USER_CANCELLED, user=None, client_ip=ip, ts_ms=now_ms
            )
        self.auditor.emit(event)
        return resp

    def _retry_path(self, saved: StepupState) -> str:
        """Where "Try again" goes: the page the user wanted (it restarts the step-up)."""
        return saved.return_path

    async def _finish_login(
        self, tokens: dict[str, Any], saved: StepupState, now: int, audit: _Audit
    ) -> web.StreamResponse:
        access = tokens.get("access_token")
        try:
            if not isinstance(access, str) or not access:
                raise TokenError("the token response has no access_token")
            identity = await self.tokens.verify_access_token(access, now)
        except TokenError as exc:
            # e.g. an opaque access token where a JWT is expected: refused, logged, audited.
            audit.error = str(exc)
            return self._refusal(
                403,
                "Sign-in refused",
                "The sign-in could not be verified.",
                reason=Reason.TOKEN_REJECTED,
                level=LOGIN_LEVEL,
                back=saved.return_path,
                audit=audit,
                precise=Reason.ACCESS_TOKEN_REJECTED,
            )
        factor = factor_of(identity.evidence.amr)
        self._completion(LOGIN_LEVEL, Reason.SUCCESS, factor)
        if self.auditor is not None:
            ev = identity.evidence
            self.auditor.emit(
                mapping.login_completed(
                    user=identity.user,
                    session=session_key(identity.issuer, identity.subject, identity.session_id),
                    issuer=identity.issuer,
                    acr=ev.acr,
                    amr=ev.amr,
                    auth_time=ev.auth_time,
                    client_ip=audit.ip,
                    ts_ms=int(self.clock() * 1000),
                )
            )
        log.info("sign-in completed", extra={"factor": factor, "acr": identity.evidence.acr})
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

    async def _finish_stepup(
        self,
        id_token: IdToken,
        saved: StepupState,
        now: int,
        request: web.Request,
        audit: _Audit,
    ) -> web.StreamResponse:
        assert saved.level is not None and saved.user_key is not None
        assert saved.session_key is not None and saved.issuer is not None
        assert saved.subject is not None
        level = self.policy.current.policy.by_name.get(saved.level)
        evidence = id_token.evidence
        factor = factor_of(evidence.amr)
        device, ip = await presented(
            request, now, peer_header=self.s.peer_header, devices=self.devices
        )
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
            audit.device, audit.error = device, str(exc)
            names = self._names(saved.level, saved.return_path, request)
            return self._refusal(
                403,
                "Step-up not accepted",
                _refusal_text(exc.reason),
                reason=exc.reason,
                level=saved.level,
                back=saved.return_path,
                factor=factor,
                audit=audit,
                why=why_text(*names),
            )
        if self.auditor is not None:
            # Audit before grant: no grant exists without its durable completion record,
            # which names the device the grant is bound to (a new device cookie's hash).
            try:
                await self.auditor.durable(self._completion_event(saved, id_token, grant))
            except AuditUnavailable:
                return self._unavailable(
                    reason=Reason.AUDIT_UNAVAILABLE,
                    level=saved.level,
                    back=saved.return_path,
                    audit=audit,
                )
        try:
            await self.store.write_grant(saved.user_key, saved.session_key, grant, now)
        except (StoreError, ValueError) as exc:
            # The completion is on record; this failure follows it: no grant was stored.
            self.metrics.redis_errors.labels(op="write").inc()
            audit.error = f"the grant was not stored: {exc}"
            return self._unavailable(
                reason=Reason.STORE_ERROR, level=saved.level, back=saved.return_path, audit=audit
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
