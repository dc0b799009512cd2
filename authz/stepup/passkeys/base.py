"""The passkey endpoints' shared part: dependencies, identity, request parsing, refusals.

``Refusal`` is how every handler denies: an HTTP status, a reason slug, the rule that failed
and a detail; ``PasskeyBase._refusal_json`` turns it into the JSON answer (with a decision
id), the metric and the audit record. See ``handlers`` for the endpoints.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from aiohttp import web

from authz.audit.sinks import Auditor
from authz.config.settings import Settings
from authz.core.attributes import cookie_values
from authz.core.policy import Level, Policy
from authz.core.reasons import Reason
from authz.core.session import Evidence, Grant, Identity, session_key, user_key
from authz.errors import StoreError, TokenError
from authz.ops.metrics import Metrics
from authz.stepup.link import ContextSigner
from authz.stepup.passkeys import pages, records, rules
from authz.stepup.passkeys.attestation import Mds
from authz.stepup.passkeys.ceremonies import RelyingParty
from authz.stepup.passkeys.links import LinkSigner, Transaction
from authz.stepup.passkeys.records import PasskeyRecord
from authz.store.credentials import (
    Credential,
    Durability,
    RedisCredentialStore,
)

log = logging.getLogger("authz.passkeys")

MAX_BODY = 64 * 1024
NAME_MAX = 64

# What a user reads for a refusal (the slug, rule and decision id go with it).
MESSAGES: Mapping[str, str] = {
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
    Reason.TRANSACTION_INVALID: "The details of the request to approve could not be "
    "verified. Go back to the page and submit it again.",
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


class PasskeyBase:
    """What every passkey handler shares: its dependencies and the small helpers."""

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
                request.headers.get("Cookie", ""), self.s.cookie(self.settings.oidc.token_cookie)
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
        message = MESSAGES.get(exc.reason) or exc.detail or "The request was refused."
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

    def _context(
        self, level: Level, ctx: str, now: int, session_key: str
    ) -> tuple[str | None, str | None]:
        """The device and IP of a valid step-up link the Check issued for this session."""
        if self.signer is None:
            return None, None
        try:
            link = self.signer.verify(ctx, level=level.name, now=now)
        except ValueError as exc:
            raise Refusal(400, Reason.LINK_INVALID, "the step-up link expired") from exc
        if link.session_key != session_key:
            raise Refusal(403, Reason.LINK_OTHER_SESSION, "the link was made for another sign-in")
        return link.device, link.ip

    def _transaction(self, level: Level, tx: str, now: int, session: str) -> Transaction | None:
        """The request a transaction-bound level approves, as the Check signed it for this
        session; a Refusal for no link, an edited or old one, or one of another session."""
        if level.transaction is None:
            return None
        try:
            t = self.links.transaction(
                tx, level=level.name, session=session, now=now, max_age_s=level.transaction.ttl_s
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
