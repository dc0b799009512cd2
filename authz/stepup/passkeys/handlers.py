"""The passkey endpoints on the step-up port (``add_routes``), under ``<prefix>/passkey``.

=======================================  ==================================================
``GET  /passkey?level&rd[&ctx][&tx]``    the step-up page (falls back to the IdP start)
``POST /passkey/authenticate/options``   a challenge for this session and browser
``POST /passkey/authenticate/verify``    the assertion -> a grant (``core.grants``)
``GET  /passkey/keys``                   the user's credentials; add and remove
``POST /passkey/register/options``       an enrolment challenge (fresh step-up required)
``POST /passkey/register/verify``        the attestation -> a credential
``POST /passkey/keys/remove``            remove one of the user's own credentials
``GET  /passkey/static/*``               the pages' stylesheet and script
=======================================  ==================================================

Who is asking is the access token (the same cookie or bearer the Check reads): every
ceremony is bound to that session (the session key is in the challenge state and must match
at verification) and to this browser (the state id travels only in an HttpOnly cookie).
State-changing requests are JSON POSTs whose ``Origin`` must be an allowed origin (a
cross-site form cannot send them). Every failure is a deny with a reason slug, a decision id
(shown to the user, in the metric and in the audit record) and a way back.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urlsplit

from aiohttp import web

from authz.audit.sinks import Auditor, AuditUnavailable
from authz.check.devices import cookie_device_id
from authz.config.settings import Settings
from authz.core.attributes import cookie_values
from authz.core.grants import GrantRefused, Proof, Target, grant_for
from authz.core.policy import Level, Policy
from authz.core.reasons import Reason
from authz.core.session import Evidence, Grant, Identity, session_key, user_key
from authz.errors import StoreError, TokenError
from authz.ops.metrics import Metrics
from authz.stepup.endpoints import safe_return_path
from authz.stepup.link import ContextSigner
from authz.stepup.passkeys import attestation, ceremonies, pages, records, rules
from authz.stepup.passkeys.attestation import Mds, PasskeyRefused
from authz.stepup.passkeys.ceremonies import RelyingParty
from authz.stepup.passkeys.links import LinkSigner, Transaction
from authz.stepup.passkeys.records import PasskeyRecord
from authz.store.credentials import (
    Credential,
    Durability,
    RedisCredentialStore,
    TransactionGrant,
    b64u,
    unb64u,
    with_use,
)

log = logging.getLogger("authz.passkeys")

MAX_BODY = 64 * 1024
_NAME_MAX = 64

# What a user reads for a refusal (the slug, rule and decision id go with it).
_MESSAGES: Mapping[str, str] = {
    Reason.NO_CREDENTIAL: "You have no security key that this page accepts.",
    Reason.CREDENTIAL_UNKNOWN: "That security key is not registered to you.",
    Reason.USER_VERIFICATION_REQUIRED: "This page needs your key's PIN or fingerprint, "
    "and the key did not check it.",
    Reason.COUNTER_REGRESSION: "This security key reported a use count lower than before: "
    "it may have been copied. It was not accepted; contact support.",
    Reason.DEVICE_BOUND_REQUIRED: "This page needs a security key bound to one device; "
    "a synced passkey is not accepted.",
    Reason.AUTHENTICATOR_NOT_ALLOWED: "This model of security key is not accepted here.",
    Reason.ENROLLED_DURING_STEPUP: "A key added during this step-up cannot complete it. Go "
    "back to the page you wanted and step up again.",
    Reason.ENROLMENT_NOT_ALLOWED: "To add or remove a key, first confirm your sign-in.",
    Reason.STATE_INVALID: "This attempt expired or was already used. Try again.",
    Reason.STATE_MISMATCH: "This attempt belongs to another sign-in. Try again.",
    Reason.ORIGIN_NOT_ALLOWED: "The request did not come from this site.",
    Reason.ORIGIN_MISSING: "The request did not come from this site.",
    Reason.TRANSACTION_INVALID: "The request to approve could not be read. Go back and try again.",
    Reason.CREDENTIAL_EXISTS: "This security key is already registered.",
    Reason.TOO_MANY_CREDENTIALS: "You have registered the most keys allowed. Remove one first.",
    Reason.ENROLMENT_DURABILITY: "Adding keys is paused: the key store is not durable. "
    "Contact support.",
    Reason.STORE_ERROR: "The service is busy. Try again shortly.",
    Reason.AUDIT_UNAVAILABLE: "The service is busy. Try again shortly.",
}


class Tokens(Protocol):
    async def verify_access_token(self, token: str, now: int) -> Identity: ...


class GrantWriter(Protocol):
    async def write_grant(
        self, user: str, session: str, grant: Grant, now: int, *, remember_device: bool = True
    ) -> None: ...


class LoadedPolicy(Protocol):
    @property
    def policy(self) -> Policy: ...
    @property
    def version(self) -> str: ...


class PolicySource(Protocol):
    @property
    def current(self) -> LoadedPolicy: ...


class PasskeyAudit(Protocol):
    async def durable(self, record: PasskeyRecord) -> None: ...
    def emit(self, record: PasskeyRecord) -> None: ...


class AuditorBridge:
    """The service's Auditor, speaking passkey records (through ``records.to_audit_event``)."""

    def __init__(self, auditor: Auditor) -> None:
        self._auditor = auditor

    async def durable(self, record: PasskeyRecord) -> None:
        await self._auditor.durable(records.to_audit_event(record))

    def emit(self, record: PasskeyRecord) -> None:
        self._auditor.emit(records.to_audit_event(record))


class Refusal(Exception):
    def __init__(self, status: int, reason: str, detail: str = "", rule: str = "") -> None:
        self.status, self.reason, self.detail, self.rule = status, reason, detail, rule
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Who:
    identity: Identity
    uk: str
    sk: str


def relying_party(settings: Settings) -> RelyingParty:
    pk = settings.passkeys
    public = urlsplit(settings.stepup.public_url)
    origin = f"{public.scheme}://{public.netloc}"
    return RelyingParty(
        id=pk.rp_id or (public.hostname or ""),
        name=pk.rp_name,
        origins=pk.origins or (origin,),
    )


class PasskeyRoutes:
    def __init__(
        self,
        *,
        settings: Settings,
        policy: PolicySource,
        tokens: Tokens,
        credentials: RedisCredentialStore,
        grants: GrantWriter,
        metrics: Metrics,
        links: LinkSigner,
        signer: ContextSigner | None = None,
        mds: Mds | None = None,
        audit: PasskeyAudit | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.pk = settings.passkeys
        self.s = settings.stepup
        self.policy = policy
        self.tokens = tokens
        self.store = credentials
        self.grants = grants
        self.metrics = metrics
        self.links = links
        self.signer = signer
        self.mds = mds
        self.audit = audit
        self.clock = clock
        self.rp = relying_party(settings)
        self.base = f"{self.s.path_prefix}/passkey"
        self.static = f"{self.base}/static"
        name = self.pk.cookie
        self.cookie = name if self.s.cookie_secure else name.removeprefix("__Host-")
        self.durability: Durability | None = None
        self.leeway = settings.oidc.leeway_s

    # -- wiring ---------------------------------------------------------------------------

    async def startup(self) -> Durability | None:
        """The start-up check of the credential Redis (logged; kept for enrolment)."""
        try:
            self.durability = await self.store.durability()
        except StoreError as exc:
            log.warning("passkeys: cannot check the credential store", extra={"error": str(exc)})
            self.durability = None
            return None
        if not self.durability.ok:
            action = "enrolment is refused" if self.pk.durability == "refuse" else "WARNING"
            log.warning(
                "passkeys: the Redis holding credentials is not durable (%s): %s",
                action,
                "; ".join(self.durability.problems),
            )
        if self.mds is not None and not self.mds.verified:
            log.warning(
                "passkeys: FIDO MDS statements from %s are not signature-verified here "
                "(set passkeys.mds.blob_file for a signed BLOB)",
                self.mds.source,
            )
        return self.durability

    def add_to(self, app: web.Application) -> None:
        b = self.base
        app.router.add_get(b, self.stepup_page)
        app.router.add_post(f"{b}/authenticate/options", self.authenticate_options)
        app.router.add_post(f"{b}/authenticate/verify", self.authenticate_verify)
        app.router.add_get(f"{b}/keys", self.keys_page)
        app.router.add_post(f"{b}/register/options", self.register_options)
        app.router.add_post(f"{b}/register/verify", self.register_verify)
        app.router.add_post(f"{b}/keys/remove", self.remove)
        app.router.add_get(f"{b}/static/{{name}}", self.static_file)

    # -- helpers --------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock())

    @property
    def _policy(self) -> Policy:
        return self.policy.current.policy

    def _headers(self) -> dict[str, str]:
        return {
            "Cache-Control": "no-store",
            "Content-Security-Policy": pages.CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
        }

    def _html(self, status: int, text: str) -> web.Response:
        return web.Response(
            status=status, text=text, content_type="text/html", headers=self._headers()
        )

    def _error_page(
        self, status: int, title: str, detail: str, back: str, *, retry: str | None = None
    ) -> web.Response:
        decision_id = os.urandom(16).hex()
        log.info("passkey page refused", extra={"decision_id": decision_id, "title": title})
        body = pages.error_page(
            title, detail, decision_id=decision_id, back=back, static=self.static, retry=retry
        )
        return self._html(status, body)

    def _json(self, doc: Mapping[str, Any], status: int = 200) -> web.Response:
        return web.json_response(dict(doc), status=status, headers=self._headers())

    async def _identity(self, request: web.Request) -> Who | None:
        auth = request.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        if not token:
            values = cookie_values(
                request.headers.get("Cookie", ""), self.settings.oidc.token_cookie
            )
            token = values[0] if len(values) == 1 and values[0] else None
        if not token:
            return None
        try:
            ident = await self.tokens.verify_access_token(token, self._now())
        except TokenError:
            return None
        return Who(
            ident,
            user_key(ident.issuer, ident.subject),
            session_key(ident.issuer, ident.subject, ident.session_id),
        )

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if request.headers.get("Origin") not in self.rp.origins:
            raise Refusal(403, Reason.ORIGIN_MISSING, "a same-origin request is required")
        if request.content_type != "application/json":
            raise Refusal(415, Reason.BAD_REQUEST, "send JSON")
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise Refusal(413, Reason.BAD_REQUEST, "the request is too large")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Refusal(400, Reason.BAD_REQUEST, "the request is not JSON") from exc
        if not isinstance(doc, dict):
            raise Refusal(400, Reason.BAD_REQUEST, "the request is not a JSON object")
        return doc

    def _refusal_json(
        self,
        exc: Refusal,
        *,
        kind: str,
        level: str | None,
        who: Who | None,
        cred: Credential | None = None,
    ) -> web.Response:
        decision_id = os.urandom(16).hex()
        self._count(kind, str(exc.reason), level)
        if exc.reason == Reason.COUNTER_REGRESSION:
            self.metrics.passkey_clones.inc()
        if who is not None and self.audit is not None:
            self.audit.emit(
                records.ceremony(
                    kind=kind,
                    outcome="refused",
                    user=who.identity.user,
                    session=who.sk,
                    level=level,
                    decision_id=decision_id,
                    now_ms=int(self.clock() * 1000),
                    reason=str(exc.reason),
                    rule=exc.rule or None,
                    credential=cred,
                    clone_suspected=exc.reason == Reason.COUNTER_REGRESSION,
                )
            )
        log.info(
            "passkey ceremony refused",
            extra={
                "decision_id": decision_id,
                "kind": kind,
                "reason": str(exc.reason),
                "rule": exc.rule,
                "stepup_level": level,
            },
        )
        message = _MESSAGES.get(exc.reason) or exc.detail or "The request was refused."
        return self._json(
            {
                "error": message,
                "reason": str(exc.reason),
                "rule": exc.rule,
                "detail": exc.detail,
                "decision_id": decision_id,
            },
            exc.status,
        )

    def _count(self, kind: str, result: str, level: str | None) -> None:
        self.metrics.passkey_ceremonies.labels(kind=kind, result=result, level=level or "").inc()

    def _passkey_level(self, name: object) -> Level:
        level = self._policy.by_name.get(name) if isinstance(name, str) else None
        if level is None or not level.offers("passkey") or not level.needs_evidence:
            raise Refusal(400, Reason.PASSKEY_NOT_OFFERED, "this level does not use passkeys")
        return level

    def _context(self, level: Level, ctx: str, now: int) -> tuple[str | None, str | None]:
        if self.signer is None:
            return None, None
        try:
            return self.signer.verify(ctx, level=level.name, now=now)
        except ValueError as exc:
            raise Refusal(400, Reason.STATE_INVALID, "the step-up link expired") from exc

    def _transaction(self, level: Level, tx: str, now: int) -> Transaction | None:
        if level.transaction is None:
            return None
        try:
            t = self.links.transaction(
                tx, level=level.name, now=now, max_age_s=level.transaction.ttl_s
            )
        except ValueError as exc:
            raise Refusal(400, Reason.TRANSACTION_INVALID, str(exc)) from exc
        if level.transaction.require_body and not t.has_body:
            raise Refusal(
                400, Reason.TRANSACTION_INVALID, "this level binds the body; none was sent"
            )
        return t

    def _started(self, level: Level, who: Who, st: object, now: int) -> int:
        try:
            return self.links.start(str(st or ""), level=level.name, session=who.sk, now=now)
        except ValueError as exc:
            raise Refusal(400, Reason.STATE_INVALID, "reload the page and try again") from exc

    def _login(self, rd: str) -> web.Response:
        url = f"{self.s.path_prefix}/login?rd={quote(rd, safe='')}"
        return web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})

    def _idp_link(self, level: Level, rd: str, ctx: str) -> str:
        url = f"{self.s.path_prefix}/start?level={quote(level.name)}&rd={quote(rd, safe='')}"
        return url + (f"&ctx={quote(ctx, safe='')}" if ctx else "")

    def _why(self, level: Level, rd: str, tx: Transaction | None) -> str | None:
        if tx is not None:
            host, method, path = tx.host, tx.method, tx.path_and_query.split("?")[0]
        else:
            host, method, path = self.rp.id, "GET", rd.split("?")[0]
        route = self._policy.route_for(host, method, path)
        return route.title if route is not None and route.title else None

    def _set_state_cookie(self, resp: web.StreamResponse, state_id: str) -> None:
        resp.set_cookie(
            self.cookie,
            state_id,
            max_age=self.pk.challenge_ttl_s,
            path="/",
            secure=self.s.cookie_secure,
            httponly=True,
            samesite="Strict",
        )

    async def _take_state(self, request: web.Request, kind: str, who: Who) -> dict[str, Any]:
        ids = cookie_values(request.headers.get("Cookie", ""), self.cookie)
        if len(ids) != 1 or not ids[0]:
            raise Refusal(400, Reason.STATE_INVALID, "no ceremony in progress in this browser")
        try:
            state = await self.store.take_state(ids[0])
        except StoreError as exc:
            self.metrics.redis_errors.labels(op="state").inc()
            raise Refusal(503, Reason.STORE_ERROR) from exc
        if state is None or state.get("kind") != kind:
            raise Refusal(400, Reason.STATE_INVALID, "expired, used, or another ceremony")
        if state.get("sk") != who.sk:
            raise Refusal(400, Reason.STATE_MISMATCH, "started by another session")
        return state

    async def _recent_evidence(self, who: Who) -> list[tuple[str | None, Evidence]]:
        policy = self._policy
        enrol = policy.by_name.get(self.pk.enrol_level or "")
        levels = [lv.name for lv in policy.levels if enrol and lv.rank >= enrol.rank]
        levels = [lv for lv in levels if lv in policy.grant_levels]
        out: list[tuple[str | None, Evidence]] = [(None, who.identity.evidence)]
        try:
            for g in await self.store.session_grants(who.uk, who.sk, levels):
                if g.is_live(self._now()):
                    out.append((g.level, g.evidence))
        except StoreError:
            self.metrics.redis_errors.labels(op="read").inc()
            raise
        return out

    async def _may_change(self, who: Who) -> bool:
        return rules.enrolment_allowed(
            self._policy,
            self.pk.enrol_level,
            await self._recent_evidence(who),
            now=self._now(),
            window_s=self.pk.enrol_window_s,
            leeway=self.leeway,
        )

    # -- the step-up page -----------------------------------------------------------------

    async def stepup_page(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        landing = self.s.landing_path
        rd = safe_return_path(q.get("rd"), landing)
        now = self._now()
        try:
            level = self._passkey_level(q.get("level"))
        except Refusal:
            return self._error_page(400, "Unknown step-up", "The link you followed is invalid.", rd)
        who = await self._identity(request)
        if who is None:
            return self._login(request.path_qs)
        ctx, tx_token = q.get("ctx", ""), q.get("tx", "")
        try:
            device, ip = self._context(level, ctx, now)
            tx = self._transaction(level, tx_token, now)
        except Refusal as exc:
            return self._error_page(
                400, "This step-up link cannot be used", exc.detail or "It expired.", rd
            )
        try:
            started = self._started(level, who, q.get("st"), now)
        except Refusal:
            # First load of this step-up: fix when it began, keep it across reloads.
            st = self.links.sign_start(level=level.name, session=who.sk, now=now)
            params = {k: v for k, v in q.items() if k != "st"}
            params["st"] = st
            url = f"{self.base}?{urlencode(params)}"
            return web.Response(status=303, headers={"Location": url, "Cache-Control": "no-store"})
        try:
            creds = await self.store.credentials(who.uk)
        except StoreError:
            self.metrics.redis_errors.labels(op="read").inc()
            return self._error_page(503, "Temporarily unavailable", "Try again shortly.", rd)
        fallback = self._idp_link(level, rd, ctx) if level.offers("idp") else None
        keys_url = f"{self.base}/keys?for={quote(level.name)}&rd={quote(request.path_qs, safe='')}"
        if not rules.usable(level, creds, started):
            if fallback is not None:
                return web.Response(
                    status=302, headers={"Location": fallback, "Cache-Control": "no-store"}
                )
            if self.pk.no_credential == "enrol" and not creds:
                return web.Response(
                    status=303, headers={"Location": keys_url, "Cache-Control": "no-store"}
                )
        _ = device, ip  # bound into the grant at verification, from the same signed ctx
        view = pages.StepupView(
            level_label=level.label,
            route_label=self._why(level, rd, tx),
            return_to=rd if tx is None else landing if rd == landing else rd,
            fallback_url=fallback,
            keys_url=keys_url,
            action=(tx.method, tx.host, tx.path_and_query) if tx is not None else None,
            shown=tx.shown if tx is not None else (),
            body_bound=bool(tx and tx.has_body),
            uv_required=level.user_verification == "required",
            data={
                "api": self.base,
                "level": level.name,
                "rd": rd,
                "ctx": ctx,
                "tx": tx_token,
                "st": str(q.get("st")),
                "fallback": fallback or "",
            },
        )
        return self._html(200, pages.stepup_page(view, self.static))

    # -- authentication -------------------------------------------------------------------

    async def authenticate_options(self, request: web.Request) -> web.StreamResponse:
        kind, level_name, who = "authenticate", None, None
        try:
            body = await self._body(request)
            level = self._passkey_level(body.get("level"))
            level_name = level.name
            who = await self._identity(request)
            if who is None:
                raise Refusal(401, Reason.NO_CREDENTIALS, "sign in first")
            now = self._now()
            device, ip = self._context(level, str(body.get("ctx") or ""), now)
            tx = self._transaction(level, str(body.get("tx") or ""), now)
            if tx is not None and (tx.device, tx.ip) != (None, None):
                device, ip = tx.device, tx.ip
            started = self._started(level, who, body.get("st"), now)
            try:
                creds = await self.store.credentials(who.uk)
            except StoreError as exc:
                raise Refusal(503, Reason.STORE_ERROR) from exc
            if not creds:
                raise Refusal(400, Reason.NO_CREDENTIAL, "register a security key first")
            allowed, first = [], None
            for c in creds:
                try:
                    rules.refuse_for_stepup(level, c, started)
                    allowed.append(c)
                except PasskeyRefused as exc:
                    first = first or exc
            if not allowed:
                assert first is not None
                raise Refusal(403, first.reason, first.detail, first.rule)
            challenge = ceremonies.new_challenge(tx.digest if tx is not None else None)
            rd = safe_return_path(str(body.get("rd") or ""), self.s.landing_path)
            state_id = secrets.token_urlsafe(32)
            state = {
                "kind": kind,
                "challenge": b64u(challenge),
                "uk": who.uk,
                "sk": who.sk,
                "level": level.name,
                "rd": rd,
                "device": device,
                "ip": ip,
                "started": started,
                "tx": tx.digest if tx is not None else None,
                "iat": now,
            }
            try:
                await self.store.put_state(state_id, state, self.pk.challenge_ttl_s)
            except StoreError as exc:
                self.metrics.redis_errors.labels(op="state").inc()
                raise Refusal(503, Reason.STORE_ERROR) from exc
        except Refusal as exc:
            return self._refusal_json(exc, kind=kind, level=level_name, who=who)
        options = ceremonies.authentication_options(
            self.rp,
            challenge=challenge,
            user_verification=level.user_verification,
            allow=allowed,
            timeout_ms=self.pk.challenge_ttl_s * 1000,
        )
        self._count(kind, "started", level.name)
        if self.audit is not None:
            self.audit.emit(
                records.ceremony(
                    kind=kind,
                    outcome="started",
                    user=who.identity.user,
                    session=who.sk,
                    level=level.name,
                    decision_id=os.urandom(16).hex(),
                    now_ms=int(self.clock() * 1000),
                    device=device,
                )
            )
        resp = self._json({"publicKey": options})
        self._set_state_cookie(resp, state_id)
        return resp

    async def authenticate_verify(self, request: web.Request) -> web.StreamResponse:
        kind, level_name, who, cred = "authenticate", None, None, None
        decision_id = os.urandom(16).hex()
        try:
            body = await self._body(request)
            who = await self._identity(request)
            if who is None:
                raise Refusal(401, Reason.NO_CREDENTIALS, "sign in first")
            state = await self._take_state(request, kind, who)
            level_name = str(state.get("level"))
            level = self._passkey_level(level_name)
            response = body.get("credential")
            if not isinstance(response, dict):
                raise Refusal(400, Reason.RESPONSE_INVALID, "no credential in the request")
            try:
                cid = ceremonies.credential_id_of(response)
                try:
                    got = await self.store.get(who.uk, cid)
                except StoreError as exc:
                    raise Refusal(503, Reason.STORE_ERROR) from exc
                if got is None:
                    raise Refusal(403, Reason.CREDENTIAL_UNKNOWN, "not one of your keys")
                cred, sealed = got
                rules.refuse_for_stepup(level, cred, int(state["started"]))
                challenge = unb64u(str(state["challenge"]))
                tx_digest = state.get("tx")
                if level.transaction is not None and not (
                    isinstance(tx_digest, str)
                    and ceremonies.challenge_commits_to(challenge, tx_digest)
                ):
                    raise Refusal(400, Reason.TRANSACTION_INVALID, "the challenge lost its request")
                asserted = ceremonies.verify_assertion(
                    response,
                    rp=self.rp,
                    challenge=challenge,
                    credential=cred,
                    require_uv=level.user_verification == "required",
                )
            except PasskeyRefused as exc:
                raise Refusal(403, exc.reason, exc.detail, exc.rule) from exc
            now = self._now()
            updated = with_use(
                cred, sign_count=asserted.sign_count, backup_state=asserted.backup_state, now=now
            )
            try:
                if not await self.store.advance(who.uk, sealed, updated):
                    # Another assertion with this key landed between our read and write.
                    raise Refusal(
                        409, Reason.COUNTER_REGRESSION, "used twice at once", "webauthn.sign_count"
                    )
            except StoreError as exc:
                raise Refusal(503, Reason.STORE_ERROR) from exc
            evidence = Evidence(
                acr=level.passkey_acr,
                amr=ceremonies.amr_for(
                    device_bound=not asserted.backup_eligible,
                    user_verified=asserted.user_verified,
                ),
                auth_time=now,
            )
            issuer, subject = who.identity.issuer, who.identity.subject
            device, ip = state.get("device"), state.get("ip")
            device = device if isinstance(device, str) else None
            ip = ip if isinstance(ip, str) else None
            try:
                grant = grant_for(
                    level,
                    Target(issuer, subject, device=device, ip=ip),
                    # The ceremony ran in the browser the state cookie names, for the session
                    # the token names; the device and IP are the ones the Check signed.
                    Proof(
                        issuer,
                        subject,
                        evidence,
                        challenged_at=int(state["iat"]),
                        device=device,
                        ip=ip,
                    ),
                    now=now,
                    leeway=self.leeway,
                    default_ttl_s=self.s.default_grant_ttl_s,
                    ttl_cap_s=level.transaction.ttl_s if level.transaction else None,
                )
            except GrantRefused as exc:
                raise Refusal(403, exc.reason, exc.detail, "core.grants") from exc
            if self.audit is not None:
                try:  # audit before grant, as the IdP callback does
                    await self.audit.durable(
                        records.ceremony(
                            kind=kind,
                            outcome="success",
                            user=who.identity.user,
                            session=who.sk,
                            level=level.name,
                            decision_id=decision_id,
                            now_ms=int(self.clock() * 1000),
                            credential=updated,
                            device=device,
                        )
                    )
                except AuditUnavailable as exc:
                    raise Refusal(503, Reason.AUDIT_UNAVAILABLE) from exc
            try:
                if level.transaction is not None:
                    assert isinstance(tx_digest, str)
                    await self.store.put_transaction_grant(
                        who.uk, who.sk, TransactionGrant(grant, tx_digest), now
                    )
                else:
                    await self.grants.write_grant(who.uk, who.sk, grant, now)
            except (StoreError, ValueError) as exc:
                self.metrics.redis_errors.labels(op="write").inc()
                raise Refusal(503, Reason.STORE_ERROR) from exc
        except Refusal as exc:
            return self._refusal_json(exc, kind=kind, level=level_name, who=who, cred=cred)
        self._count(kind, "success", level.name)
        self.metrics.completions.labels(level=level.name, result="success", factor="passkey").inc()
        log.info(
            "passkey step-up granted",
            extra={
                "decision_id": decision_id,
                "stepup_level": level.name,
                "amr": list(grant.evidence.amr),
                "expires_at": grant.expires_at,
            },
        )
        resp = self._json({"redirect": state["rd"], "decision_id": decision_id})
        resp.del_cookie(self.cookie, path="/")
        return resp

    # -- the keys page and enrolment ------------------------------------------------------

    async def keys_page(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        rd = safe_return_path(q.get("rd"), self.s.landing_path)
        who = await self._identity(request)
        if who is None:
            return self._login(request.path_qs)
        try:
            creds = await self.store.credentials(who.uk)
            can = await self._may_change(who)
        except StoreError:
            return self._error_page(503, "Temporarily unavailable", "Try again shortly.", rd)
        policy = self._policy
        enrol = policy.by_name.get(self.pk.enrol_level or "")
        stepup_url = None
        if enrol is not None and enrol.needs_evidence:
            ctx = ""
            if self.signer is not None:
                dev = cookie_values(
                    request.headers.get("Cookie", ""), self.settings.devices.cookie or ""
                )
                device = cookie_device_id(dev[0]) if len(dev) == 1 and dev[0] else None
                ctx = self.signer.sign(level=enrol.name, device=device, ip=None, now=self._now())
            stepup_url = self._idp_link(enrol, request.path_qs, ctx)
        describe = {}
        if self.mds is not None:
            for c in creds:
                entry = self.mds.entry(c.aaguid)
                if entry is not None:
                    describe[c.aaguid] = entry.description
        notice = (
            "Security key added."
            if q.get("added")
            else "Security key removed."
            if q.get("removed")
            else None
        )
        keep = {k: v for k, v in q.items() if k not in ("added", "removed")}
        view = pages.KeysView(
            credentials=creds,
            describe=describe,
            can_change=can,
            stepup_url=stepup_url,
            enrol_level_label=enrol.label if enrol is not None else None,
            window_min=max(1, self.pk.enrol_window_s // 60),
            return_to=rd,
            notice=notice,
            data={
                "api": self.base,
                "for": q.get("for", ""),
                "self": f"{self.base}/keys?{urlencode(keep)}",
            },
        )
        return self._html(200, pages.keys_page(view, self.static))

    def _wants_attestation(self) -> bool:
        return any(
            lv.authenticators is not None and lv.authenticators.wants_attestation
            for lv in self._policy.levels
            if lv.offers("passkey")
        )

    async def register_options(self, request: web.Request) -> web.StreamResponse:
        kind, who = "register", None
        try:
            body = await self._body(request)
            who = await self._identity(request)
            if who is None:
                raise Refusal(401, Reason.NO_CREDENTIALS, "sign in first")
            name = str(body.get("name") or "").strip()
            if not name or len(name) > _NAME_MAX or any(ord(c) < 0x20 for c in name):
                raise Refusal(400, Reason.BAD_REQUEST, f"a name of 1 to {_NAME_MAX} characters")
            for_level = body.get("for") or None
            if for_level is not None and for_level not in self._policy.by_name:
                raise Refusal(400, Reason.LEVEL_UNKNOWN, "unknown level")
            if (
                self.pk.durability == "refuse"
                and self.durability is not None
                and not self.durability.ok
            ) or (self.pk.durability == "refuse" and self.durability is None):
                raise Refusal(
                    503, Reason.ENROLMENT_DURABILITY, "the credential store may lose data"
                )
            try:
                if not await self._may_change(who):
                    raise Refusal(
                        403,
                        Reason.ENROLMENT_NOT_ALLOWED,
                        f"needs a step-up at {self.pk.enrol_level} within "
                        f"{self.pk.enrol_window_s} s",
                        "enrolment.fresh_stepup",
                    )
                existing = await self.store.credentials(who.uk)
            except StoreError as exc:
                raise Refusal(503, Reason.STORE_ERROR) from exc
            if len(existing) >= self.pk.max_credentials:
                raise Refusal(409, Reason.TOO_MANY_CREDENTIALS, "remove a key first")
            now = self._now()
            challenge = ceremonies.new_challenge()
            state_id = secrets.token_urlsafe(32)
            state = {
                "kind": kind,
                "challenge": b64u(challenge),
                "uk": who.uk,
                "sk": who.sk,
                "name": name,
                "for": for_level,
                "iat": now,
            }
            try:
                await self.store.put_state(state_id, state, self.pk.challenge_ttl_s)
            except StoreError as exc:
                raise Refusal(503, Reason.STORE_ERROR) from exc
        except Refusal as exc:
            return self._refusal_json(exc, kind=kind, level=None, who=who)
        uv = (
            "required"
            if any(
                lv.user_verification == "required"
                for lv in self._policy.levels
                if lv.offers("passkey")
            )
            else "preferred"
        )
        options = ceremonies.registration_options(
            self.rp,
            user_handle=bytes.fromhex(who.uk),
            user_name=who.identity.subject,
            challenge=challenge,
            user_verification=uv,
            attestation=self._wants_attestation(),
            exclude=existing,
            timeout_ms=self.pk.challenge_ttl_s * 1000,
        )
        self._count(kind, "started", None)
        resp = self._json({"publicKey": options})
        self._set_state_cookie(resp, state_id)
        return resp

    async def register_verify(self, request: web.Request) -> web.StreamResponse:
        kind, who = "register", None
        decision_id = os.urandom(16).hex()
        try:
            body = await self._body(request)
            who = await self._identity(request)
            if who is None:
                raise Refusal(401, Reason.NO_CREDENTIALS, "sign in first")
            state = await self._take_state(request, kind, who)
            response = body.get("credential")
            if not isinstance(response, dict):
                raise Refusal(400, Reason.RESPONSE_INVALID, "no credential in the request")
            try:
                reg = ceremonies.verify_registration(
                    response,
                    rp=self.rp,
                    challenge=unb64u(str(state["challenge"])),
                    require_uv=False,
                )
            except PasskeyRefused as exc:
                raise Refusal(403, exc.reason, exc.detail, exc.rule) from exc
            certified = False
            if self.mds is not None and reg.x5c:
                certified, _why = self.mds.attested(reg.aaguid, reg.x5c)
            now = self._now()
            cred = Credential(
                credential_id=reg.credential_id,
                public_key=reg.public_key,
                sign_count=reg.sign_count,
                aaguid=reg.aaguid,
                issuer=who.identity.issuer,
                subject=who.identity.subject,
                rp_id=self.rp.id,
                created_at=now,
                name=str(state.get("name") or "Security key"),
                backup_eligible=reg.backup_eligible,
                backup_state=reg.backup_state,
                transports=reg.transports,
                attestation_fmt=reg.fmt,
                certified=certified,
                user_verified=reg.user_verified,
                enrolled_level=self.pk.enrol_level,
                enrolled_session=who.sk,
            )
            self._accepted_somewhere(cred, state.get("for"))
            record = records.enrolled(
                cred, session=who.sk, decision_id=decision_id, now_ms=int(self.clock() * 1000)
            )
            if self.audit is not None:
                try:  # the archive must hold the credential before the registry does
                    await self.audit.durable(record)
                except AuditUnavailable as exc:
                    raise Refusal(503, Reason.AUDIT_UNAVAILABLE) from exc
            try:
                added = await self.store.add(who.uk, cred)
            except StoreError as exc:
                added = 0
                self._compensate(cred, who, decision_id)
                raise Refusal(503, Reason.STORE_ERROR) from exc
            if added != 1:
                self._compensate(cred, who, decision_id)
                if added == -1:
                    raise Refusal(409, Reason.CREDENTIAL_EXISTS, "already registered")
                raise Refusal(409, Reason.TOO_MANY_CREDENTIALS, "remove a key first")
        except Refusal as exc:
            return self._refusal_json(exc, kind=kind, level=None, who=who)
        self._count(kind, "success", None)
        self.metrics.passkey_credentials.labels(op="enrolled").inc()
        log.info("passkey enrolled", extra={"decision_id": decision_id, "aaguid": cred.aaguid})
        resp = self._json({"ok": True, "credential_id": cred.id_b64, "decision_id": decision_id})
        resp.del_cookie(self.cookie, path="/")
        return resp

    def _accepted_somewhere(self, cred: Credential, for_level: object) -> None:
        """Refuse a credential the level it is for (or every passkey level) would refuse."""
        auth = rules.authenticator_of(cred)
        policy = self._policy
        if isinstance(for_level, str) and for_level in policy.by_name:
            targets = [policy.by_name[for_level]]
        else:
            targets = [lv for lv in policy.levels if lv.offers("passkey")]
            if not targets or rules.accepting_levels(policy, auth):
                return
        try:
            for lv in targets:
                attestation.check(lv.authenticators, auth)
        except PasskeyRefused as exc:
            raise Refusal(403, exc.reason, exc.detail, exc.rule) from exc

    def _compensate(self, cred: Credential, who: Who, decision_id: str) -> None:
        """The enrolment record is archived but the credential did not land: say so, so a
        restore from the archive does not bring it back."""
        if self.audit is not None:
            self.audit.emit(
                records.removed(
                    cred,
                    by="enrolment-failed",
                    session=who.sk,
                    decision_id=decision_id,
                    now_ms=int(self.clock() * 1000),
                )
            )

    async def remove(self, request: web.Request) -> web.StreamResponse:
        kind, who = "remove", None
        decision_id = os.urandom(16).hex()
        try:
            body = await self._body(request)
            who = await self._identity(request)
            if who is None:
                raise Refusal(401, Reason.NO_CREDENTIALS, "sign in first")
            try:
                cid = unb64u(str(body.get("credential_id") or ""))
            except ValueError as exc:
                raise Refusal(400, Reason.BAD_REQUEST, "not a credential id") from exc
            try:
                if not await self._may_change(who):
                    raise Refusal(
                        403,
                        Reason.ENROLMENT_NOT_ALLOWED,
                        "removing a key needs a fresh step-up",
                        "enrolment.fresh_stepup",
                    )
                got = await self.store.get(who.uk, cid)
                if got is None:
                    raise Refusal(404, Reason.CREDENTIAL_UNKNOWN, "not one of your keys")
                record = records.removed(
                    got[0],
                    by="user",
                    session=who.sk,
                    decision_id=decision_id,
                    now_ms=int(self.clock() * 1000),
                )
                if self.audit is not None:
                    try:
                        await self.audit.durable(record)
                    except AuditUnavailable as exc:
                        raise Refusal(503, Reason.AUDIT_UNAVAILABLE) from exc
                await self.store.remove(who.uk, cid)
            except StoreError as exc:
                raise Refusal(503, Reason.STORE_ERROR) from exc
        except Refusal as exc:
            return self._refusal_json(exc, kind=kind, level=None, who=who)
        self._count(kind, "success", None)
        self.metrics.passkey_credentials.labels(op="removed").inc()
        return self._json({"ok": True, "decision_id": decision_id})

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        types = {"passkey.js": "text/javascript", "passkey.css": "text/css"}
        if name not in types:
            raise web.HTTPNotFound()
        return web.Response(
            body=pages.static_file(name),
            content_type=types[name],
            headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
        )


def add_routes(app: web.Application, routes: PasskeyRoutes) -> None:
    """Mount the passkey endpoints on the step-up port's application."""
    routes.add_to(app)
