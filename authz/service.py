"""Authorizer.check: token -> level -> session -> decide -> metrics/log. Fails closed.

The session store is read only when the request needs more than the token itself proves
(a public level, a missing/invalid token, or a token whose own acr/auth_time satisfy the
level decide without it), and then in exactly one round trip under the store's deadline.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from authz.adapters.metrics import Metrics
from authz.audit.mapping import event_for_check, requires_durable
from authz.audit.sinks import Auditor, AuditUnavailable
from authz.core.attributes import RequestAttributes, cookie_values
from authz.core.decision import Decision, Outcome, evaluate, resolve_level, token_satisfies
from authz.core.reasons import Reason
from authz.core.session import Grant, Identity, SessionSnapshot, session_key
from authz.errors import KeysUnavailable, StoreError, TokenError
from authz.policy_file import PolicyHolder

log = logging.getLogger("authz.check")

# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_BEARER = re.compile(r"Bearer ([A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)


class AccessTokenVerifier(Protocol):
    async def verify_access_token(self, token: str, now: int) -> Identity: ...


class SessionReader(Protocol):
    async def read(self, session_key: str, levels: tuple[str, ...]) -> SessionSnapshot: ...


def extract_token(attrs: RequestAttributes, cookie_name: str) -> tuple[str | None, str | None]:
    """(token, error reason). A malformed or ambiguous credential is an error, not absent."""
    auth = attrs.headers.get("authorization")
    if auth is not None:
        m = _BEARER.fullmatch(auth.strip())
        if m is None:  # another scheme, two values joined by Envoy, junk
            return None, Reason.TOKEN_INVALID
        return m.group(1), None
    cookie = attrs.headers.get("cookie")
    if cookie:
        values = cookie_values(cookie, cookie_name)
        if len(values) > 1:  # two cookies of one name: which one the app sees is unclear
            return None, Reason.TOKEN_INVALID
        if values and values[0]:
            return values[0], None
    return None, None


class Authorizer:
    def __init__(
        self,
        *,
        policy: PolicyHolder,
        tokens: AccessTokenVerifier,
        store: SessionReader,
        metrics: Metrics,
        token_cookie: str,
        leeway: int,
        clock: Callable[[], float] = time.time,
        auditor: Auditor | None = None,
        audit_level: str | None = None,
    ) -> None:
        self.policy = policy
        self.tokens = tokens
        self.store = store
        self.metrics = metrics
        self.token_cookie = token_cookie
        self.leeway = leeway
        self.clock = clock
        self.auditor = auditor
        self.audit_level = audit_level  # level name; allows at/above it are audited durably

    async def check(self, attrs: RequestAttributes) -> tuple[Decision, str]:
        decision_id = uuid.uuid4().hex
        started = time.perf_counter()
        try:
            decision = await self._decide(attrs)
            if self.auditor is not None:
                decision = await self._audit(decision, decision_id, attrs)
        except Exception:
            # Re-check after evaluating: whatever escaped is a deny, never an allow.
            log.exception("check failed", extra={"decision_id": decision_id})
            decision = Decision(Outcome.ERROR, Reason.INTERNAL_ERROR)
        self.record(decision, decision_id, attrs, time.perf_counter() - started)
        return decision, decision_id

    def record(
        self, decision: Decision, decision_id: str, attrs: RequestAttributes | None,
        elapsed: float,
    ) -> None:
        m = self.metrics
        level = decision.level.name if decision.level is not None else ""
        m.checks.labels(decision.outcome.value, str(decision.reason), level).inc()
        m.check_duration.observe(elapsed)
        if decision.outcome is Outcome.ERROR:
            m.fail_closed.labels(cause=str(decision.reason)).inc()
        elif decision.outcome is Outcome.STEP_UP:
            mode = "redirect" if attrs is not None and attrs.accepts_html else "challenge"
            m.challenges.labels(level=level, mode=mode).inc()
        if decision.outcome is not Outcome.ALLOW and log.isEnabledFor(logging.INFO):
            log.info("denied", extra={
                "decision_id": decision_id,
                "outcome": decision.outcome.value,
                "reason": str(decision.reason),
                "level": level,
                "user": decision.identity.user if decision.identity else None,
                "method": attrs.method if attrs else None,
                "host": attrs.host if attrs else None,
                "path": attrs.path if attrs else None,
                "request_id": attrs.request_id if attrs else None,
            })

    async def _audit(
        self, decision: Decision, decision_id: str, attrs: RequestAttributes
    ) -> Decision:
        """Audit before access: an allow at/above the audit level is returned only once its
        record is durably accepted; otherwise the Check fails closed (audit-unavailable).
        Every other audited outcome goes through the bounded, non-blocking buffer."""
        auditor = self.auditor
        assert auditor is not None
        loaded = self.policy.current
        level = loaded.policy.by_name.get(self.audit_level) if self.audit_level else None
        event = event_for_check(decision, decision_id, attrs, audit_level=level,
                                policy_version=loaded.version)
        if event is None:
            return decision
        if not requires_durable(decision, level):
            auditor.emit(event)
            return decision
        try:
            await auditor.durable(event)
        except AuditUnavailable:
            denied = Decision(Outcome.ERROR, Reason.AUDIT_UNAVAILABLE, level=decision.level,
                              identity=decision.identity, fired=decision.fired)
            # Same decision id: a timed-out XADD that did land is followed by this denial.
            fail = event_for_check(denied, decision_id, attrs, audit_level=level,
                                   policy_version=loaded.version)
            if fail is not None:
                auditor.emit(fail)
            return denied
        return decision

    async def _decide(self, attrs: RequestAttributes) -> Decision:
        policy = self.policy.current.policy
        now = int(self.clock())
        resolution = resolve_level(policy, attrs)
        if resolution.deny is not None or (
            resolution.level is not None and resolution.level.public
        ):
            return evaluate(resolution, None, (), now, leeway=self.leeway)
        token, token_error = extract_token(attrs, self.token_cookie)
        identity: Identity | None = None
        if token is not None:
            try:
                identity = await self.tokens.verify_access_token(token, now)
            except KeysUnavailable:
                return Decision(Outcome.ERROR, Reason.KEYS_UNAVAILABLE, level=resolution.level)
            except TokenError as exc:
                token_error = exc.reason
        assert resolution.level is not None
        if identity is None or token_satisfies(resolution.level, identity, now, self.leeway):
            return evaluate(resolution, identity, (), now, leeway=self.leeway,
                            token_error=token_error)
        key = session_key(identity.issuer, identity.subject, identity.session_id)
        try:
            snapshot = await self.store.read(key, policy.grant_levels)
        except StoreError:
            self.metrics.redis_errors.labels(op="read").inc()
            return Decision(Outcome.ERROR, Reason.SESSION_STORE_UNAVAILABLE,
                            level=resolution.level, identity=identity)
        grants: tuple[Grant, ...] = snapshot.grants
        return evaluate(resolution, identity, grants, now, leeway=self.leeway)
