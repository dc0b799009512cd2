"""The ``stepup.v1.Sessions`` servicer: record grants for external factor services, revoke
sessions and users, list a user's sessions.

Every call is authenticated (``CallerAuth``) before anything else, and audited: a recorded
grant as ``stepup.completed`` (with ``via=api`` and the caller as ``actor``), a revocation
as ``grant.revoked``. A refused RecordGrant is audited too (result = the refusal slug).
The audit hook may be synchronous (``Auditor.emit``) or return an awaitable
(``Auditor.durable``): RecordGrant writes the grant only after that awaitable succeeds, so
no grant exists without its record; revocations are never held back by the audit trail.
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import NoReturn

import grpc

from authz.admin.auth import CallerAuth
from authz.admin.proto.stepup.v1 import sessions_pb2, sessions_pb2_grpc
from authz.audit.events import AuditEvent
from authz.audit.mapping import grant_revoked, stepup_completed
from authz.core.grants import GrantRefused, Proof, Target, grant_for
from authz.core.policy import Level
from authz.core.reasons import Reason
from authz.core.session import Evidence, Grant, session_key, user_key
from authz.errors import StoreError
from authz.store.interfaces import AdminStore, SessionInfo

log = logging.getLogger("authz.api")

AuditHook = Callable[[AuditEvent], Awaitable[None] | None]
SERVICE_NAME: str = sessions_pb2.DESCRIPTOR.services_by_name["Sessions"].full_name

_MAX_FIELD = 256  # issuer, subject, sid, acr, amr entries, device
_MAX_AMR = 16
_SESSION_KEY = re.compile(r"[0-9a-f]{40}")


class _Invalid(Exception):
    def __init__(self, slug: Reason, message: str) -> None:
        super().__init__(message)
        self.slug = slug


def _text(name: str, value: str, *, required: bool = True) -> str:
    if required and not value:
        raise _Invalid(Reason.ARGUMENT_INVALID, f"{name} is required")
    if len(value) > _MAX_FIELD or not value.isprintable():
        raise _Invalid(Reason.ARGUMENT_INVALID, f"{name} is too long or not printable")
    return value


def _ip(value: str) -> str | None:
    """The IP normalised as the Check path sees it (IPv4-mapped IPv6 -> IPv4)."""
    if not value:
        return None
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise _Invalid(Reason.ARGUMENT_INVALID, "ip is not an IP address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def _user(user: sessions_pb2.User) -> tuple[str, str]:
    return _text("user.issuer", user.issuer), _text("user.subject", user.subject)


def _grant_pb(g: Grant) -> sessions_pb2.Grant:
    ev = g.evidence
    return sessions_pb2.Grant(
        level=g.level,
        acr=ev.acr or "",
        amr=list(ev.amr),
        auth_time=ev.auth_time or 0,
        issued_at=g.issued_at,
        expires_at=g.expires_at,
        device=g.device or "",
        ip=g.ip or "",
    )


def _session_pb(s: SessionInfo) -> sessions_pb2.Session:
    return sessions_pb2.Session(
        session_key=s.session,
        created=s.created,
        last_seen=s.last_seen,
        ip=s.ip or "",
        device=s.device or "",
        grants=[_grant_pb(g) for g in s.grants],
    )


# The generated grpc module is untyped (grpcio-tools writes no .pyi for it); mypy skips it.
class SessionsServicer(sessions_pb2_grpc.SessionsServicer):
    def __init__(
        self,
        store: AdminStore,
        *,
        levels: Callable[[str], Level | None],
        auth: CallerAuth,
        audit: AuditHook | None = None,
        clock: Callable[[], float] = time.time,
        leeway: int = 30,
        default_grant_ttl_s: int = 900,
    ) -> None:
        self.store = store
        self.levels = levels
        self.auth = auth
        self.audit = audit
        self.clock = clock
        self.leeway = leeway
        self.default_grant_ttl_s = default_grant_ttl_s

    async def _caller(self, context: grpc.aio.ServicerContext) -> str:
        actor = self.auth.identify(context)
        if actor is None:
            log.warning("sessions API: unauthenticated call", extra={"peer": context.peer()})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "caller not authenticated")
        assert actor is not None
        return actor

    async def _emit(self, event: AuditEvent) -> None:
        if self.audit is None:
            return
        result = self.audit(event)
        if inspect.isawaitable(result):
            await result

    async def RecordGrant(
        self, request: sessions_pb2.RecordGrantRequest, context: grpc.aio.ServicerContext
    ) -> sessions_pb2.RecordGrantResponse:
        actor = await self._caller(context)
        now = int(self.clock())
        try:
            iss, sub = _user(request.user)
            sid = _text("session_id", request.session_id)
            level = self.levels(request.level)
            if level is None:
                raise _Invalid(Reason.LEVEL_UNKNOWN, f"no level {request.level!r} in the policy")
            amr = tuple(_text("amr", a) for a in request.amr)
            if len(amr) > _MAX_AMR:
                raise _Invalid(Reason.ARGUMENT_INVALID, "too many amr values")
            acr = _text("acr", request.acr, required=False) or None
            device = _text("device", request.device, required=False) or None
            ip = _ip(request.ip)
            auth_time = request.auth_time if request.HasField("auth_time") else now
            if request.ttl_s < 0:
                raise _Invalid(Reason.ARGUMENT_INVALID, "ttl_s must be >= 0")
            evidence = Evidence(acr=acr, amr=amr, auth_time=auth_time)
            try:
                grant = grant_for(
                    level,
                    Target(iss, sub, device=device, ip=ip),
                    Proof(iss, sub, evidence, device=device, ip=ip),
                    now=now,
                    leeway=self.leeway,
                    default_ttl_s=self.default_grant_ttl_s,
                    ttl_cap_s=request.ttl_s or None,
                )
            except GrantRefused as exc:
                raise _Invalid(exc.reason, str(exc)) from None
        except _Invalid as exc:
            await self._audit_grant(request, actor, exc.slug, None)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from exc  # abort raises
        uk, sk = user_key(iss, sub), session_key(iss, sub, sid)
        try:
            await self._audit_grant(request, actor, Reason.SUCCESS, grant, session=sk, ip=ip)
        except Exception:
            log.exception("sessions API: audit unavailable; grant not recorded")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "audit trail unavailable")
        try:
            await self.store.write_grant(uk, sk, grant, now)
        except StoreError as exc:
            await self._unavailable(context, exc)
        log.info(
            "sessions API: grant recorded",
            extra={"actor": actor, "level": grant.level, "expires_at": grant.expires_at},
        )
        return sessions_pb2.RecordGrantResponse(
            grant_id=f"{sk}:{grant.level}", expires_at=grant.expires_at, session_key=sk
        )

    async def _audit_grant(
        self,
        request: sessions_pb2.RecordGrantRequest,
        actor: str,
        result: Reason,
        grant: Grant | None,
        *,
        session: str | None = None,
        ip: str | None = None,
    ) -> None:
        user = f"{request.user.issuer}|{request.user.subject}"
        event = stepup_completed(
            result=result,
            level=request.level or None,
            user=user,
            session=session,
            acr=request.acr or None,
            amr=tuple(request.amr),
            auth_time=grant.evidence.auth_time
            if grant
            else (request.auth_time if request.HasField("auth_time") else None),
            issuer=request.user.issuer or None,
            client_ip=ip,
            device=request.device or None,
            grant_expires_at=grant.expires_at if grant else None,
        )
        details = MappingProxyType({**event.details, "via": "api", "actor": actor})
        event = dataclasses.replace(event, details=details)
        if grant is None:
            try:  # a refusal's record is best effort: the caller gets the refusal anyway
                await self._emit(event)
            except Exception:
                log.exception("sessions API: audit of a refused grant failed")
            return
        await self._emit(event)

    async def RevokeSession(
        self, request: sessions_pb2.RevokeSessionRequest, context: grpc.aio.ServicerContext
    ) -> sessions_pb2.RevokeSessionResponse:
        actor = await self._caller(context)
        now = int(self.clock())
        try:
            iss, sub = _user(request.user)
            which = request.WhichOneof("session")
            if which == "session_id":
                sk = session_key(iss, sub, _text("session_id", request.session_id))
            elif which == "session_key" and _SESSION_KEY.fullmatch(request.session_key):
                sk = request.session_key
            else:
                raise _Invalid(Reason.ARGUMENT_INVALID, "session_id or a session_key is required")
            reason = _text("reason", request.reason, required=False) or None
        except _Invalid as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from exc
        try:
            known = await self.store.revoke_session(user_key(iss, sub), sk, now)
        except StoreError as exc:
            await self._unavailable(context, exc)
        await self._audit_revoke(
            grant_revoked(
                user=f"{iss}|{sub}",
                session=sk,
                levels=(),
                revoked=int(known),
                actor=actor,
                reason=reason or Reason.API_REVOKE_SESSION,
            )
        )
        return sessions_pb2.RevokeSessionResponse(known=known, session_key=sk)

    async def RevokeUser(
        self, request: sessions_pb2.RevokeUserRequest, context: grpc.aio.ServicerContext
    ) -> sessions_pb2.RevokeUserResponse:
        actor = await self._caller(context)
        now = int(self.clock())
        try:
            iss, sub = _user(request.user)
            reason = _text("reason", request.reason, required=False) or None
        except _Invalid as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from exc
        try:
            n = await self.store.revoke_user(user_key(iss, sub), now)
        except StoreError as exc:
            await self._unavailable(context, exc)
        await self._audit_revoke(
            grant_revoked(
                user=f"{iss}|{sub}",
                session="*",
                levels=(),
                revoked=n,
                actor=actor,
                reason=reason or Reason.API_REVOKE_USER,
            )
        )
        return sessions_pb2.RevokeUserResponse(sessions=n, revoked_before=now)

    async def ListSessions(
        self, request: sessions_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> sessions_pb2.ListSessionsResponse:
        actor = await self._caller(context)
        try:
            iss, sub = _user(request.user)
        except _Invalid as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from exc
        try:
            sessions = await self.store.list_sessions(user_key(iss, sub))
        except StoreError as exc:
            await self._unavailable(context, exc)
        # No audit event type for reads: the access is logged with the caller instead.
        log.info("sessions API: sessions listed", extra={"actor": actor, "count": len(sessions)})
        return sessions_pb2.ListSessionsResponse(sessions=[_session_pb(s) for s in sessions])

    async def _audit_revoke(self, event: AuditEvent) -> None:
        try:  # the revocation has happened: a failing audit sink must not hide that
            await self._emit(event)
        except Exception:
            log.exception("sessions API: audit of a revocation failed")

    async def _unavailable(self, context: grpc.aio.ServicerContext, exc: StoreError) -> NoReturn:
        log.warning("sessions API: store unavailable", extra={"error": str(exc)})
        await context.abort(grpc.StatusCode.UNAVAILABLE, "session store unavailable")
        raise AssertionError("unreachable") from exc


def add_to_server(servicer: SessionsServicer, server: grpc.aio.Server) -> None:
    sessions_pb2_grpc.add_SessionsServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
