"""Who asks, and the start of a push step-up: the caller's verified token, the level and
action named, the limits, the IdP's backchannel request, the stored record."""

from __future__ import annotations

import json
import math
import secrets

from authz.audit import mapping
from authz.core.decision import revoked
from authz.core.policy import Level
from authz.core.reasons import Reason
from authz.errors import KeysUnavailable, OidcError, StoreError, TokenError
from authz.stepup.ciba.backchannel import BackchannelRefused
from authz.stepup.ciba.base import (
    CONTROL,
    Caller,
    CibaRefused,
    FlowBase,
    Started,
    Who,
    audit_id,
    jwt_claims,
    log,
)
from authz.stepup.ciba.request import (
    CibaRequest,
    StartError,
    StartRequest,
    binding_message,
    check_action,
    new_code,
    pick_level,
)
from authz.stepup.profiles import claims_request


class StartFlow(FlowBase):
    # -- who asks -------------------------------------------------------------------------

    async def identify(self, token: str | None, now: int) -> Caller:
        """The caller's verified identity and its login hint; CibaRefused 401/503."""
        if not token:
            raise self._refuse(401, Reason.NO_CREDENTIALS, "a bearer token is required")
        try:
            identity = await self.access_tokens.verify_access_token(token, now)
        except KeysUnavailable as exc:
            raise self._refuse(
                503, exc.reason, "the token cannot be checked now", retry_after=exc.retry_after_s
            ) from None
        except TokenError as exc:
            raise self._refuse(401, exc.reason, "the token is not acceptable") from None
        claim = self.s.login_hint_claim or self.profile.subject_claims[0]
        if claim == self.profile.subject_claims[0]:
            return Caller(identity, identity.subject)
        # Another claim of the same token, which the verifier has just accepted (a JWT: an
        # introspected opaque token has no claims to read here).
        claims = jwt_claims(token)
        hint = claims.get(claim) if claims is not None else None
        if not isinstance(hint, str) or not hint or len(hint) > 256 or CONTROL.search(hint):
            raise self._refuse(
                400,
                Reason.LOGIN_HINT_UNAVAILABLE,
                f"the token has no usable `{claim}` claim",
                Who(identity.user),
            )
        return Caller(identity, hint)

    def bad_start(self, caller: Caller, reason: Reason, detail: str) -> CibaRefused:
        """A start request that cannot be read: refused like every other (400)."""
        return self._refuse(400, reason, detail, Who(caller.identity.user, caller.session_key))

    # -- start ----------------------------------------------------------------------------

    async def start(
        self,
        caller: Caller,
        start: StartRequest,
        *,
        host: str,
        device: str | None,
        ip: str | None,
    ) -> Started:
        now = int(self.clock())
        i = caller.identity
        user, sk = i.user, caller.session_key
        loaded = self.policy.current
        try:
            level = pick_level(loaded.policy, start)
            check_action(loaded.policy, level, host, start.method, start.path)
        except StartError as exc:
            raise self._refuse(400, exc.reason, exc.detail, Who(user, sk)) from None
        route = f"{start.method} {host} {start.path}"
        ctx = Who(user, sk, level.name, route)
        if level.bind_device and device is None:
            raise self._refuse(
                400, Reason.DEVICE_REQUIRED, f"{level.name} is bound to a device", ctx
            )
        if level.bind_ip and ip is None:
            raise self._refuse(400, Reason.IP_REQUIRED, f"{level.name} is bound to an address", ctx)
        request_id = secrets.token_urlsafe(24)
        expiry = min(start.requested_expiry or self.s.max_expiry_s, self.s.max_expiry_s)
        try:
            await self._not_revoked(caller, level.name, now)
            held = await self.requests.claim_slot(sk, request_id, expiry)
        except StoreError as exc:
            raise self._store_refusal(exc, ctx) from None
        if held:
            # One pending push per session: a second one would only add to the noise.
            raise self._refuse(
                429, Reason.CIBA_PENDING, "a push is already pending", ctx, retry_after=held
            )
        try:
            await self._limits(caller, ctx)
            return await self._send(
                caller, level, request_id, start, expiry, now, route, device, ip
            )
        except StoreError as exc:
            await self._release_slot(sk, request_id)
            raise self._store_refusal(exc, ctx) from None
        except BaseException:
            await self._release_slot(sk, request_id)
            raise

    async def _not_revoked(self, caller: Caller, level: str, now: int) -> None:
        """A session ended at the IdP (back-channel logout, the Sessions API) starts no
        pushes: its token still verifies, its grants would never be honoured."""
        if self.sessions is None:
            return
        state = await self.sessions.read_check(
            user=caller.user_key,
            session=caller.session_key,
            levels=(),
            level=level,
            device=None,
            ip=None,
            sensitive=False,
            window_s=60,
            now=now,
        )
        if revoked(caller.identity, state):
            raise self._refuse(
                401,
                Reason.SESSION_REVOKED,
                "this session has ended",
                Who(caller.identity.user, caller.session_key, level),
            )

    async def _limits(self, caller: Caller, ctx: Who) -> None:
        """Starts per session and per user per window (push bombing: a stolen
        password-level token must not flood the user's phone), and this process's room."""
        window = self.s.rate_window_s
        for counter, limit in (
            (f"s:{caller.session_key}", self.s.max_per_session),
            (f"u:{caller.user_key}", self.s.max_per_user),
        ):
            count, left = await self.requests.hit(counter, window)
            if count > limit:
                raise self._refuse(
                    429, Reason.RATE_LIMITED, "too many pushes; try later", ctx, retry_after=left
                )
        if not self.has_room():
            raise self._refuse(503, Reason.IDP_UNAVAILABLE, "too many pushes in flight", ctx)

    def _params(self, caller: Caller, level: Level, message: str, expiry: int) -> dict[str, str]:
        p = self.profile
        params = {
            "scope": " ".join(p.scope),
            "login_hint": caller.login_hint,
            "binding_message": message,
            "requested_expiry": str(expiry),
        }
        if p.send_acr_values and level.acr:
            params["acr_values"] = " ".join(sorted(level.acr))
        if p.claims_request:
            req = claims_request(p, acr=level.acr, amr_any=level.amr_any, max_age=level.max_age)
            if req is not None:
                params["claims"] = json.dumps(req, separators=(",", ":"), sort_keys=True)
        return params

    async def _send(
        self,
        caller: Caller,
        level: Level,
        request_id: str,
        start: StartRequest,
        expiry: int,
        now: int,
        route: str,
        device: str | None,
        ip: str | None,
    ) -> Started:
        i = caller.identity
        ctx = Who(i.user, caller.session_key, level.name, route)
        message = binding_message(
            new_code(), start.method, start.path, self.s.binding_message_chars
        )
        params = self._params(caller, level, message, expiry)
        try:
            ack = await self.backchannel.authenticate(params)
        except BackchannelRefused as exc:
            raise self._refuse(
                502, Reason.IDP_ERROR, str(exc), ctx, idp_error=exc.idp_error
            ) from None
        except OidcError as exc:
            raise self._refuse(503, Reason.IDP_UNAVAILABLE, str(exc), ctx) from None
        answered = math.ceil(self.clock())
        interval = max(ack.interval or self.s.default_interval_s, self.s.min_interval_s)
        record = CibaRequest(
            auth_req_id=ack.auth_req_id,
            level=level.name,
            issuer=i.issuer,
            subject=i.subject,
            user_key=caller.user_key,
            session_key=caller.session_key,
            route=route,
            binding_message=message,
            issued_at=now,
            expires_at=now + min(ack.expires_in, expiry),
            interval=interval,
            next_poll_at=answered + interval,
            device=device,
            ip=ip,
        )
        # A store error here leaves the user's phone with a request nobody will poll: it
        # expires at the IdP (the caller answers 503).
        await self.requests.create(request_id, record.to_json(), self._ttl(record, now))
        if self.auditor is not None:
            self.auditor.emit(
                mapping.ciba_started(
                    level=level.name,
                    user=i.user,
                    session=caller.session_key,
                    request_id=audit_id(ack.auth_req_id),
                    acr_values=params.get("acr_values", "").split(),
                    binding=True,
                    route=route,
                    client_ip=ip,
                    device=device,
                    policy_version=self.policy.current.version,
                    ts_ms=int(self.clock() * 1000),
                )
            )
        self._count("started", Reason.SUCCESS, level.name)
        log.info(
            "push step-up started",
            extra={
                "stepup_level": level.name,
                "interval": interval,
                "expires_in": record.expires_at - now,
            },
        )
        if self.schedule is not None:
            self.schedule(request_id, record.next_poll_at)
        return Started(request_id, record)
