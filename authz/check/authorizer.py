"""Authorizer.check: route level -> device, GeoIP, token -> the one session read ->
``authz.core.decision.decide`` (signals, rules, grants) -> audit, metrics, log. Fails closed.

Every signed-in request to a non-public level reads the user's state in exactly one round
trip under the store's deadline (grants, revocations, known devices and IPs, velocity):
a revocation is honoured by the very next Check. What an allow teaches (first access to a
level, the last sighting) is written afterwards, off the Check's critical path.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from authz.audit.mapping import allowed_record, event_for_check, requires_durable
from authz.audit.sinks import AuditTrail, AuditUnavailable
from authz.check.devices import DeviceResolver
from authz.check.geoip import GeoIP
from authz.check.tokens import AccessTokenVerifier
from authz.config.policy_file import PolicyHolder
from authz.core.attributes import RequestAttributes, cookie_values
from authz.core.decision import (
    CheckInputs,
    Decision,
    Outcome,
    decide,
    failed,
    route_level,
    with_transaction,
)
from authz.core.ids import new_id
from authz.core.policy import Level
from authz.core.reasons import Reason
from authz.core.session import Identity, UserState, device_tag, session_key, user_key
from authz.core.signals import Device, Geo
from authz.core.transactions import of_request
from authz.errors import KeysUnavailable, StoreError, TokenError
from authz.ops.metrics import Metrics
from authz.store.interfaces import CheckStore, TransactionGrants

log = logging.getLogger("authz.check")

# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
# The scheme is matched apart (case-insensitively, ASCII only) and the token by a pattern
# without re.IGNORECASE: under it every character of a ~1 KB token was case-folded (the
# largest self-time of our code in an HTTP-mode profile), and Unicode folding let a Kelvin
# sign stand for "k".
_BEARER_SCHEME = "bearer "
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


# What an allow teaches the store is written in the background; beyond this many writes in
# flight the lesson is skipped (and counted) rather than queueing without bound.
_MAX_BACKGROUND_WRITES = 512
# An allow whose lesson the state just read already holds (level seen; last sighting by this
# session, device, IP and place) is written again only once that sighting is this old. It
# bounds how stale what the lesson feeds may be: impossible travel measures speed against a
# sighting at most this much older than the user's last allow there (its 100 km floor over
# 60 s is 6,000 km/h, beyond any max_kmh a policy sets for a jump right after), the sessions
# index's last_seen (and so which session its bound evicts) and known device / IP recency
# are minute-precise, and the 1-day / 90-day TTLs are refreshed every minute of activity.
# Decided from the read alone: no process memory, the same answer on every replica.
_LESSON_REFRESH_S = 60


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One Check's answer: the decision and the id that joins it to its audit record, the
    response headers and Envoy's access log."""

    decision: Decision
    decision_id: str


def extract_token(attrs: RequestAttributes, cookie_name: str) -> tuple[str | None, Reason | None]:
    """(token, error reason). A malformed or ambiguous credential is an error, not absent."""
    auth = attrs.headers.get("authorization")
    if auth is not None:
        auth = auth.strip()
        scheme = auth[:7]
        m = (
            _B64TOKEN.fullmatch(auth, 7)
            if scheme.isascii() and scheme.lower() == _BEARER_SCHEME
            else None
        )
        if m is None:  # another scheme, two values joined by Envoy, junk
            return None, Reason.TOKEN_INVALID
        return m.group(), None
    cookie = attrs.headers.get("cookie")
    if cookie:
        values = cookie_values(cookie, cookie_name)
        if len(values) > 1:  # two cookies of one name: which one the app sees is unclear
            return None, Reason.TOKEN_INVALID
        if values and values[0]:
            return values[0], None
    return None, None


def lesson_is_news(
    state: UserState,
    *,
    session: str,
    level_read: bool,
    ip: str | None,
    device: str | None,
    geo: Geo | None,
    now: int,
) -> bool:
    """Whether an allow's lesson would change what matters in the store, judged from the
    state the Check read. Not news only when the level was seen (and it is the level read:
    a rule may have raised it) and the last sighting is this session's, from this device,
    IP and place, and younger than ``_LESSON_REFRESH_S``: the lesson that wrote it also
    wrote this session's index entry with that IP and device. A user's sighting is one per
    user, so with two sessions active each one's lesson rewrites it (a session's index
    entry is never left stale by another's). No IP: no sighting to judge by, always news."""
    last = state.last_seen
    if not (state.level_seen and level_read) or last is None or ip is None:
        return True
    return not (
        last.session == session
        and last.ip == ip
        and last.device == device_tag(device)
        and last.lat == (geo.lat if geo else None)
        and last.lon == (geo.lon if geo else None)
        and 0 <= now - last.at < _LESSON_REFRESH_S
    )


class Authorizer:
    def __init__(
        self,
        *,
        policy: PolicyHolder,
        tokens: AccessTokenVerifier,
        store: CheckStore,
        metrics: Metrics,
        token_cookie: str,
        leeway: int,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        auditor: AuditTrail | None = None,
        audit_level: str | None = None,
        devices: DeviceResolver | None = None,
        geoip: GeoIP | None = None,
        transactions: TransactionGrants | None = None,
    ) -> None:
        self.devices = devices
        # Where a transaction-bound level's grants are taken from (the passkey factor's
        # store); None: nothing satisfies such a level.
        self.transactions = transactions
        self.geoip = geoip
        self._background: set[asyncio.Task[None]] = set()
        self.policy = policy
        self.tokens = tokens
        self.store = store
        self.metrics = metrics
        self.token_cookie = token_cookie
        self.leeway = leeway
        self.clock = clock
        # The clock Envoy's deadlines are read on (``check(deadline=...)``); tests inject it.
        self.monotonic = monotonic
        self.auditor = auditor
        self.audit_level = audit_level  # level name; allows at/above it are audited durably

    def new_decision_id(self) -> str:
        return new_id(int(self.clock() * 1000))

    def deadline_in(self, remaining_s: float | None) -> float | None:
        """The absolute deadline (on ``monotonic``) of a Check Envoy gives ``remaining_s``
        more seconds (gRPC: the call's time remaining; HTTP: the expected request timeout
        from when the request was read); None for no deadline."""
        return None if remaining_s is None else self.monotonic() + remaining_s

    async def check(self, attrs: RequestAttributes, deadline: float | None = None) -> CheckResult:
        """Decide one Check. ``deadline`` (on ``monotonic``): when Envoy stops waiting for
        the answer. A Check still queued at its deadline (behind a stalled or saturated
        loop) is refused as ``overloaded`` before its token check and its Redis read: the
        answer could only arrive after Envoy gave up, and the work would delay the Checks
        that can still be answered in time."""
        decision_id = self.new_decision_id()
        started = time.perf_counter()
        if deadline is not None and self.monotonic() >= deadline:
            decision = self._shed(None)
            self.record(decision, decision_id, attrs, time.perf_counter() - started)
            return CheckResult(decision, decision_id)
        try:
            decision = await self._decide(attrs, deadline)
            if self.auditor is not None:
                decision = await self._audit(decision, decision_id, attrs)
        except Exception:
            # Re-check after evaluating: whatever escaped is a deny, never an allow.
            log.exception("check failed", extra={"decision_id": decision_id})
            decision = failed(Reason.INTERNAL_ERROR)
        self.record(decision, decision_id, attrs, time.perf_counter() - started)
        return CheckResult(decision, decision_id)

    def unread(
        self, decision: Decision, attrs: RequestAttributes | None = None, elapsed: float = 0.0
    ) -> CheckResult:
        """A Check answered without evaluating it (a request the listener could not read, a
        deadline it missed): given an id, counted and logged like any Check."""
        result = CheckResult(decision, self.new_decision_id())
        self.record(decision, result.decision_id, attrs, elapsed)
        return result

    def record(
        self,
        decision: Decision,
        decision_id: str,
        attrs: RequestAttributes | None,
        elapsed: float,
    ) -> None:
        m = self.metrics
        level = decision.level.name if decision.level is not None else ""
        m.checks.labels(decision.outcome.value, decision.slug, level).inc()
        m.check_duration.observe(elapsed)
        if decision.outcome is Outcome.ERROR:
            m.fail_closed.labels(cause=decision.reason).inc()
        elif decision.outcome is Outcome.STEP_UP:
            mode = "redirect" if attrs is not None and attrs.accepts_html else "challenge"
            m.challenges.labels(level=level, mode=mode).inc()
        if decision.outcome is not Outcome.ALLOW and log.isEnabledFor(logging.INFO):
            log.info(
                "denied",
                extra={
                    "decision_id": decision_id,
                    "outcome": decision.outcome.value,
                    "reason": decision.slug,
                    "stepup_level": level,
                    "user": decision.identity.user if decision.identity else None,
                    "method": attrs.method if attrs else None,
                    "host": attrs.host if attrs else None,
                    "path": attrs.path if attrs else None,
                    "request_id": attrs.request_id if attrs else None,
                },
            )

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
        if not requires_durable(decision, level):
            event = event_for_check(
                decision, decision_id, attrs, audit_level=level, policy_version=loaded.version
            )
            if event is not None:
                auditor.emit(event)
            return decision
        try:
            await auditor.durable_record(
                allowed_record(decision, decision_id, attrs, policy_version=loaded.version)
            )
        except AuditUnavailable:
            denied = failed(Reason.AUDIT_UNAVAILABLE, decision.level, decision.identity)
            # Same decision id: a timed-out XADD that did land is followed by this denial.
            fail = event_for_check(
                denied, decision_id, attrs, audit_level=level, policy_version=loaded.version
            )
            if fail is not None:
                auditor.emit(fail)
            return denied
        return decision

    def _shed(
        self, level: Level | None, identity: Identity | None = None, device: str | None = None
    ) -> Decision:
        self.metrics.shed.inc()
        return failed(Reason.OVERLOADED, level, identity, device)

    async def _decide(self, attrs: RequestAttributes, deadline: float | None = None) -> Decision:
        policy = self.policy.current.policy
        now = int(self.clock())
        base = route_level(policy, attrs)
        if base.deny is not None or base.level is None:
            return decide(policy, attrs, CheckInputs(now, self.leeway), base=base)
        level = base.level
        device = await self.devices.resolve(attrs, now) if self.devices is not None else None
        geo = self.geoip.lookup(attrs.source_ip) if self.geoip is not None else None
        identity: Identity | None = None
        token_error: Reason | None = None
        if not level.public:
            token, token_error = extract_token(attrs, self.token_cookie)
            if token is not None:
                try:
                    identity = await self.tokens.verify_access_token(token, now)
                except KeysUnavailable as exc:
                    # Not a verdict on the token: it cannot be checked yet (never
                    # invalid_token); when the refetch is only held back, say for how long.
                    return failed(Reason.KEYS_UNAVAILABLE, level, retry_after_s=exc.retry_after_s)
                except TokenError as exc:
                    token_error = exc.reason
        ip = str(attrs.source_ip) if attrs.source_ip is not None else None
        device_id = device.id if device is not None else None
        state: UserState | None = None
        if identity is not None:
            if deadline is not None and self.monotonic() >= deadline:
                return self._shed(level, identity, device_id)  # before the Redis read
            try:
                state = await self.store.read_check(
                    user=user_key(identity.issuer, identity.subject),
                    session=session_key(identity.issuer, identity.subject, identity.session_id),
                    levels=policy.grant_levels,
                    level=level.name,
                    device=device_id,
                    ip=ip,
                    sensitive=policy.is_sensitive(level),
                    window_s=policy.signals.velocity_window_s,
                    now=now,
                )
            except StoreError:
                self.metrics.redis_errors.labels(op="read").inc()
                return failed(Reason.SESSION_STORE_UNAVAILABLE, level, identity, device_id)
        inputs = CheckInputs(now, self.leeway, identity, token_error, state, device, geo)
        decision = decide(policy, attrs, inputs, base=base)
        if decision.reason is Reason.TRANSACTION_REQUIRED and identity is not None:
            decision = await self._transaction(decision, attrs, identity, ip, now, deadline)
        for name in decision.shadow:
            self.metrics.shadow_matches.labels(rule=name).inc()
        for signal in decision.signals:
            self.metrics.signals.labels(signal=signal).inc()
        if decision.outcome is Outcome.ALLOW and identity is not None and state is not None:
            self._note_allow(identity, decision, device, geo, ip, now, state, level.name)
        return decision

    async def _transaction(
        self,
        decision: Decision,
        attrs: RequestAttributes,
        identity: Identity,
        ip: str | None,
        now: int,
        deadline: float | None,
    ) -> Decision:
        """A transaction-bound level: take the grant for exactly this request, once.

        Reached only when everything else held (``decide`` said ``transaction-required``),
        so a deny for another cause never burns the grant; the extra Redis call is paid by
        these levels only. A store error fails closed."""
        level = decision.level
        assert level is not None and level.transaction is not None
        if level.transaction.require_body and attrs.body is None:
            # Envoy did not send the whole body (not rendered for this route, or cut):
            # nothing the user could approve would bind it.
            return replace(decision, outcome=Outcome.DENY, reason=Reason.TRANSACTION_INVALID)
        if self.transactions is None:
            return decision
        if deadline is not None and self.monotonic() >= deadline:
            return self._shed(level, identity, decision.device)  # before the grant is taken
        try:
            tx = await self.transactions.consume_transaction_grant(
                user_key(identity.issuer, identity.subject),
                session_key(identity.issuer, identity.subject, identity.session_id),
                level.name,
                of_request(attrs).digest,
                now,
            )
        except StoreError:
            self.metrics.redis_errors.labels(op="transaction").inc()
            return failed(Reason.SESSION_STORE_UNAVAILABLE, level, identity, decision.device)
        grant = tx.grant if tx is not None else None
        return with_transaction(decision, grant, now, leeway=self.leeway, ip=ip)

    def _note_allow(
        self,
        identity: Identity,
        decision: Decision,
        device: Device | None,
        geo: Geo | None,
        ip: str | None,
        now: int,
        state: UserState,
        read_level: str,
    ) -> None:
        if decision.level is None:
            self.metrics.redis_errors.labels(op="note").inc()
            return
        session = session_key(identity.issuer, identity.subject, identity.session_id)
        if not lesson_is_news(
            state,
            session=session,
            level_read=decision.level.name == read_level,
            ip=ip,
            device=device.id if device else None,
            geo=geo,
            now=now,
        ):
            return
        if len(self._background) >= _MAX_BACKGROUND_WRITES:
            self.metrics.redis_errors.labels(op="note").inc()
            return
        write = self.store.note_allow(
            user=user_key(identity.issuer, identity.subject),
            session=session,
            level=decision.level.name,
            ip=ip,
            device=device.id if device else None,
            now=now,
            lat=geo.lat if geo else None,
            lon=geo.lon if geo else None,
        )
        task = asyncio.ensure_future(self._quietly(write))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quietly(self, write: Awaitable[None]) -> None:
        try:
            await write
        except StoreError:
            self.metrics.redis_errors.labels(op="note").inc()

    async def drain(self) -> None:
        """Wait for the background writes (shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
