"""What both halves of the push step-up flow share: its parts (the settings, the IdP, the
stores, the audit trail), the refusal every endpoint answers with, and a few helpers.
``authz.stepup.ciba.flow`` is the flow itself."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Protocol

from authz.audit import mapping
from authz.audit.sinks import AuditTrail
from authz.check.tokens import AccessTokenVerifier, IdToken, json_object
from authz.config.policy_file import PolicyHolder
from authz.config.settings import CibaSettings
from authz.core.ids import new_id
from authz.core.reasons import Reason
from authz.core.session import Identity, session_key, user_key
from authz.errors import StoreError, TokenError
from authz.ops.metrics import Metrics
from authz.stepup.ciba.backchannel import Backchannel
from authz.stepup.ciba.request import CibaRequest
from authz.stepup.profiles import IdpProfile
from authz.store.ciba import CibaStore
from authz.store.interfaces import CheckStore, GrantStore

log = logging.getLogger("authz.stepup.ciba")

SLOW_DOWN_S = 5  # CIBA Core 1.0 section 11: slow_down adds at least 5 s, for good
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class CibaRefused(Exception):
    """A request the flow does not honour: ``status`` and ``reason`` are what the client
    gets, with ``reference`` (also in the log line and the audit record)."""

    def __init__(
        self,
        status: int,
        reason: Reason,
        detail: str,
        *,
        retry_after: int | None = None,
        reference: str = "",
    ) -> None:
        self.status = status
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after
        self.reference = reference
        super().__init__(f"{reason}: {detail}")


class BackchannelIdTokens(Protocol):
    """``authz.check.tokens.TokenVerifier.verify_backchannel_id_token``."""

    async def verify_backchannel_id_token(
        self, token: str, now: int, *, auth_req_id: str
    ) -> IdToken: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who asks, as their verified token says: the identity and the hint for the IdP."""

    identity: Identity
    login_hint: str

    @property
    def user_key(self) -> str:
        return user_key(self.identity.issuer, self.identity.subject)

    @property
    def session_key(self) -> str:
        i = self.identity
        return session_key(i.issuer, i.subject, i.session_id)


@dataclasses.dataclass(frozen=True, slots=True)
class Who:
    """What a refusal's audit record names: the user, the session, the level, the action."""

    user: str | None = None
    session: str | None = None
    level: str | None = None
    route: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Started:
    request_id: str
    request: CibaRequest


def audit_id(auth_req_id: str) -> str:
    """What the audit trail calls a request: a hash of the IdP's id (a bearer secret)."""
    return hashlib.sha256(auth_req_id.encode()).hexdigest()[:32]


def jwt_claims(token: str) -> dict[str, object] | None:
    """The payload of a compact JWS the verifier has just accepted; None for any other
    token (an opaque one that was introspected)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        return json_object(raw, "payload")
    except (ValueError, TokenError):
        return None


class FlowBase:
    def __init__(
        self,
        *,
        settings: CibaSettings,
        profile: IdpProfile,
        policy: PolicyHolder,
        access_tokens: AccessTokenVerifier,
        id_tokens: BackchannelIdTokens,
        backchannel: Backchannel,
        requests: CibaStore,
        grants: GrantStore,
        sessions: CheckStore | None,
        metrics: Metrics,
        auditor: AuditTrail | None = None,
        leeway_s: int = 30,
        default_grant_ttl_s: int = 900,
        lease_ms: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.s = settings
        self.profile = profile
        self.policy = policy
        self.access_tokens = access_tokens
        self.id_tokens = id_tokens
        self.backchannel = backchannel
        self.requests = requests
        self.grants = grants
        self.sessions = sessions
        self.metrics = metrics
        self.auditor = auditor
        self.leeway_s = leeway_s
        self.default_grant_ttl_s = default_grant_ttl_s
        # Held while one poll's answer is handled: above the IdP's timeout, so a second
        # replica cannot poll the same request while the first still waits for its answer.
        self.lease_ms = lease_ms
        self.clock = clock
        # Set by the poller: hand it a started request (False when it is full).
        self.schedule: Callable[[str, int], bool] | None = None
        self.has_room: Callable[[], bool] = lambda: True

    async def _load(self, request_id: str) -> CibaRequest | None:
        doc = await self.requests.load(request_id)
        return CibaRequest.from_json(doc) if doc is not None else None

    async def _release_slot(self, session: str, request_id: str) -> None:
        with contextlib.suppress(StoreError):
            await self.requests.release_slot(session, request_id)

    def _store_refusal(self, exc: StoreError, ctx: Who) -> CibaRefused:
        self.metrics.redis_errors.labels(op="state").inc()
        return self._refuse(503, Reason.STORE_ERROR, str(exc), ctx)

    # -- helpers --------------------------------------------------------------------------

    def _ttl(self, record: CibaRequest, now: float) -> int:
        return max(1, math.ceil(record.expires_at - now)) + self.s.result_ttl_s

    def _marker_ttl(self) -> int:
        return self.s.max_expiry_s + self.s.result_ttl_s

    def _count(self, outcome: str, reason: str, level: str) -> None:
        self.metrics.ciba.labels(outcome=outcome, reason=reason, level=level).inc()

    def _refuse(
        self,
        status: int,
        reason: Reason,
        detail: str,
        who: Who | None = None,
        *,
        retry_after: int | None = None,
        idp_error: str | None = None,
        audited: bool = True,
        shown: Reason | None = None,
    ) -> CibaRefused:
        """A refusal: counted, logged and (once the caller is known) audited under one
        reference id, which the client gets. ``shown`` is the reason the client sees when
        it differs from the one recorded (another session's id reads as unknown)."""
        who = who or Who()
        reference = new_id(int(self.clock() * 1000))
        self._count("refused", reason, who.level or "unknown")
        log.warning(
            "push step-up refused",
            extra={"decision_id": reference, "reason": reason, "stepup_level": who.level},
        )
        if audited and who.user is not None and self.auditor is not None:
            self.auditor.emit(
                mapping.ciba_failed(
                    reason=reason,
                    level=who.level,
                    user=who.user,
                    session=who.session,
                    idp_error=idp_error,
                    error=detail,
                    route=who.route,
                    decision_id=reference,
                    ts_ms=int(self.clock() * 1000),
                )
            )
        return CibaRefused(
            status, shown or reason, detail, retry_after=retry_after, reference=reference
        )
