"""The ``stepup.v1.Sessions`` servicer: record grants for external factor services, revoke
sessions and users, list a user's sessions.

Every call, in order: the caller is identified (``Callers.identify``: its own mTLS name or
bearer secret), rate-limited, checked against its scopes (the operation; for a grant the
highest level, the issuers, acr and amr it may assert), and the request is validated (bad
input: ``INVALID_ARGUMENT`` naming the field, nothing changed). A grant also needs a proof
signed with the caller's key (``authz.admin.proofs``), used once, naming the same user,
session and level; what it proved goes through the one grant rule
(``authz.core.grants.grant_for``).

Audited: a recorded or refused grant as ``stepup.completed`` (``via=api``, the caller as
``actor``), a revocation as ``grant.revoked``, a listing as ``sessions.listed``; a call of
a known caller refused for its scopes, bad input or a store failure as the same type with
outcome ``failure`` and the reason. Unauthenticated and rate-limited calls are log lines
only: nobody without a credential can fill the audit trail. The audit
hook may be synchronous (``Auditor.emit``) or return an awaitable (``Auditor.durable``):
RecordGrant writes the grant only after that awaitable succeeds, so no grant exists
without its record; revocations are never held back by the audit trail.
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import NoReturn

import grpc

from authz.admin.auth import Caller, Callers, RateLimiter
from authz.admin.config import Operation
from authz.admin.proofs import GrantProof, ProofError, ProofVerifier, replay_key
from authz.admin.proto.stepup.v1 import sessions_pb2, sessions_pb2_grpc
from authz.audit.events import AuditEvent
from authz.audit.mapping import (
    grant_revoked,
    grant_revoked_by,
    sessions_listed,
    stepup_completed,
)
from authz.core.grants import GrantRefused, Proof, Target, grant_for
from authz.core.policy import Level
from authz.core.reasons import Reason
from authz.core.session import Grant, session_key, user_key
from authz.errors import StoreError
from authz.store.interfaces import AdminStore, SessionInfo

log = logging.getLogger("authz.admin")

AuditHook = Callable[[AuditEvent], Awaitable[None] | None]
SERVICE_NAME: str = sessions_pb2.DESCRIPTOR.services_by_name["Sessions"].full_name

_MAX_FIELD = 256  # issuer, subject, sid, acr, amr entries, device
_MAX_AMR = 16
_MAX_PROOF = 8 * 1024
_SESSION_KEY = re.compile(r"[0-9a-f]{40}")


class _Invalid(Exception):
    def __init__(self, slug: Reason, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.slug = slug
        self.code = code or grpc.StatusCode.INVALID_ARGUMENT


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


def _named(user: sessions_pb2.User | None) -> str | None:
    """The user a refused call named, when it named one readably (else None)."""
    try:
        return "|".join(_user(user)) if user is not None else None
    except _Invalid:
        return None


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
        callers: Callers,
        proofs: Mapping[str, ProofVerifier],
        idp_issuers: frozenset[str],
        audit: AuditHook | None = None,
        clock: Callable[[], float] = time.time,
        limiter: RateLimiter | None = None,
        leeway: int = 30,
        default_grant_ttl_s: int = 900,
    ) -> None:
        self.store = store
        self.levels = levels
        self.callers = callers
        self.proofs = proofs
        self.idp_issuers = idp_issuers
        self.audit = audit
        self.clock = clock
        self.limiter = limiter or RateLimiter()
        self.leeway = leeway
        self.default_grant_ttl_s = default_grant_ttl_s

    async def _caller(
        self,
        context: grpc.aio.ServicerContext,
        op: Operation,
        user: sessions_pb2.User | None = None,
    ) -> Caller:
        caller = self.callers.identify(context)
        if caller is None:
            log.warning("sessions API: unauthenticated call", extra={"peer": context.peer()})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "caller not authenticated")
            raise AssertionError("unreachable")
        if not self.limiter.allow(caller.name, caller.settings.rate_per_minute):
            log.warning("sessions API: rate limited", extra={"actor": caller.name})
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit exceeded")
        if not Callers.allows(caller, op):
            log.warning(
                "sessions API: operation outside the caller's scopes",
                extra={"actor": caller.name, "operation": op},
            )
            await self._refused(op, caller.name, Reason.OUT_OF_SCOPE, user)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"{caller.name} may not {op.value}"
            )
        return caller

    async def _refused(
        self,
        op: Operation,
        caller: str,
        failure: Reason,
        user: sessions_pb2.User | None,
        session: str | None = None,
    ) -> None:
        """The one record of a known caller's refused call (best effort, as every refusal:
        the caller gets the refusal anyway)."""
        who = _named(user)
        if op is Operation.LIST:
            event = sessions_listed(caller=caller, user=who, failure=failure)
        elif op is Operation.REVOKE:
            event = grant_revoked_by(caller=caller, user=who, session=session, failure=failure)
        else:
            event = stepup_completed(
                result=failure,
                level=None,
                user=who,
                session=None,
                acr=None,
                amr=(),
                auth_time=None,
                issuer=user.issuer if user is not None and who is not None else None,
            )
            details = {**event.details, "via": "api", "actor": caller}
            event = dataclasses.replace(event, details=MappingProxyType(details))
        await self._audit_quietly(event)

    async def _emit(self, event: AuditEvent) -> None:
        if self.audit is None:
            return
        result = self.audit(event)
        if inspect.isawaitable(result):
            await result

    # -- grants ---------------------------------------------------------------------------

    async def RecordGrant(
        self, request: sessions_pb2.RecordGrantRequest, context: grpc.aio.ServicerContext
    ) -> sessions_pb2.RecordGrantResponse:
        caller = await self._caller(context, Operation.RECORD_GRANT, request.user)
        now = int(self.clock())
        proof: GrantProof | None = None
        try:
            iss, sub = _user(request.user)
            sid = _text("session_id", request.session_id)
            level = self.levels(request.level)
            if level is None:
                raise _Invalid(Reason.LEVEL_UNKNOWN, f"no level {request.level!r} in the policy")
            device = _text("device", request.device, required=False) or None
            ip = _ip(request.ip)
            if request.ttl_s < 0:
                raise _Invalid(Reason.ARGUMENT_INVALID, "ttl_s must be >= 0")
            proof = await self._proof(caller, request, now)
            if (proof.issuer, proof.subject, proof.session_id, proof.level) != (
                iss,
                sub,
                sid,
                level.name,
            ):
                raise _Invalid(
                    Reason.ARGUMENT_INVALID,
                    "the proof names another user, session or level than the request",
                )
            self._within_scope(caller, level, proof)
            try:
                grant = grant_for(
                    level,
                    Target(iss, sub, device=device, ip=ip),
                    Proof(proof.issuer, proof.subject, proof.evidence, device=device, ip=ip),
                    now=now,
                    leeway=self.leeway,
                    default_ttl_s=self.default_grant_ttl_s,
                    ttl_cap_s=request.ttl_s or None,
                )
            except GrantRefused as exc:
                raise _Invalid(exc.reason, str(exc)) from None
            await self._use_once(proof, now)
        except _Invalid as exc:
            await self._audit_grant(request, caller, exc.slug, None, proof)
            await context.abort(exc.code, str(exc))
            raise AssertionError("unreachable") from exc  # abort raises
        uk, sk = user_key(iss, sub), session_key(iss, sub, sid)
        try:
            await self._audit_grant(request, caller, Reason.SUCCESS, grant, proof, session=sk)
        except Exception:
            log.exception("sessions API: audit unavailable; grant not recorded")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "audit trail unavailable")
        try:
            await self.store.write_grant(uk, sk, grant, now)
        except StoreError as exc:
            await self._unavailable(context, exc)
        log.info(
            "sessions API: grant recorded",
            extra={"actor": caller.name, "level": grant.level, "expires_at": grant.expires_at},
        )
        return sessions_pb2.RecordGrantResponse(
            grant_id=f"{sk}:{grant.level}", expires_at=grant.expires_at, session_key=sk
        )

    async def _proof(
        self, caller: Caller, request: sessions_pb2.RecordGrantRequest, now: int
    ) -> GrantProof:
        verifier = self.proofs.get(caller.name)
        if verifier is None:  # settings guarantee one per record-grant caller
            raise _Invalid(Reason.ARGUMENT_INVALID, "no proof keys for this caller")
        if len(request.proof) > _MAX_PROOF:
            raise _Invalid(Reason.ARGUMENT_INVALID, "proof too large")
        try:
            return await verifier.verify(request.proof, now)
        except ProofError as exc:
            raise _Invalid(
                Reason.PROOF_INVALID, str(exc), grpc.StatusCode.PERMISSION_DENIED
            ) from None

    def _within_scope(self, caller: Caller, level: Level, proof: GrantProof) -> None:
        s = caller.settings
        ceiling = self.levels(s.max_level or "")
        if ceiling is None or level.rank > ceiling.rank:
            raise _Invalid(
                Reason.OUT_OF_SCOPE,
                f"{caller.name} may grant up to {s.max_level}, not {level.name}",
                grpc.StatusCode.PERMISSION_DENIED,
            )
        if proof.issuer not in s.issuers or proof.issuer not in self.idp_issuers:
            raise _Invalid(
                Reason.OUT_OF_SCOPE,
                f"{caller.name} may not grant for users of {proof.issuer}",
                grpc.StatusCode.PERMISSION_DENIED,
            )
        ev = proof.evidence
        if ev.acr is None or ev.acr not in s.acr:
            raise _Invalid(
                Reason.OUT_OF_SCOPE,
                f"{caller.name} may not assert acr {ev.acr!r}",
                grpc.StatusCode.PERMISSION_DENIED,
            )
        if len(ev.amr) > _MAX_AMR or not set(ev.amr) <= set(s.amr):
            raise _Invalid(
                Reason.OUT_OF_SCOPE,
                f"{caller.name} may not assert amr {sorted(set(ev.amr) - set(s.amr))}",
                grpc.StatusCode.PERMISSION_DENIED,
            )

    async def _use_once(self, proof: GrantProof, now: int) -> None:
        ttl = max(1, proof.expires_at - now + self.leeway)
        try:
            first = await self.store.remember_once(replay_key(proof), ttl)
        except StoreError:
            raise _Invalid(
                Reason.STORE_ERROR, "session store unavailable", grpc.StatusCode.UNAVAILABLE
            ) from None
        if not first:
            raise _Invalid(
                Reason.PROOF_REPLAYED,
                "this proof was used already",
                grpc.StatusCode.PERMISSION_DENIED,
            )

    async def _audit_grant(
        self,
        request: sessions_pb2.RecordGrantRequest,
        caller: Caller,
        result: Reason,
        grant: Grant | None,
        proof: GrantProof | None,
        *,
        session: str | None = None,
    ) -> None:
        user = f"{request.user.issuer}|{request.user.subject}"
        ev = proof.evidence if proof is not None else None
        event = stepup_completed(
            result=result,
            level=request.level or None,
            user=user,
            session=session,
            acr=ev.acr if ev else None,
            amr=ev.amr if ev else (),
            auth_time=ev.auth_time if ev else None,
            issuer=request.user.issuer or None,
            client_ip=grant.ip if grant else None,
            device=grant.device if grant else (request.device or None),
            grant_expires_at=grant.expires_at if grant else None,
        )
        details = {**event.details, "via": "api", "actor": caller.name}
        if proof is not None:
            details["proof_jti"] = proof.jti
        event = dataclasses.replace(event, details=MappingProxyType(details))
        if grant is None:
            try:  # a refusal's record is best effort: the caller gets the refusal anyway
                await self._emit(event)
            except Exception:
                log.exception("sessions API: audit of a refused grant failed")
            return
        await self._emit(event)

    # -- revocation and listing -----------------------------------------------------------

    async def RevokeSession(
        self, request: sessions_pb2.RevokeSessionRequest, context: grpc.aio.ServicerContext
    ) -> sessions_pb2.RevokeSessionResponse:
        caller = await self._caller(context, Operation.REVOKE, request.user)
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
            await self._refused(Operation.REVOKE, caller.name, exc.slug, request.user)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from exc
        try:
            known = await self.store.revoke_session(user_key(iss, sub), sk, now)
        except StoreError as exc:
            await self._refused(Operation.REVOKE, caller.name, Reason.STORE_ERROR, request.user, sk)
            await self._unavailable(context, exc)
        await self._audit_quietly(
            grant_revoked(
                user=f"{iss}|{sub}",
                session=sk,
                levels=(),
                revoked=int(known),
                actor=caller.name,
                reason=reason or Reason.API_REVOKE_SESSION,
            )
        )
        return sessions_pb2.RevokeSessionResponse(known=known, session_key=sk)

    async def RevokeUser(
        self, request: sessions_pb2.RevokeUserRequest, context: grpc.aio.ServicerContext
    ) -> sessions_pb2.RevokeUserResponse:
        caller = await self._caller(context, Operation.REVOKE, request.user)
        now = int(self.clock())
        try:
            iss, sub = _user(request.user)
            reason = _text("reason", request.reason, required=False) or None
        except _Invalid as exc:
            await self._refused(Operation.REVOKE, caller.name, exc.slug, request.user)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from exc
        try:
            n = await self.store.revoke_user(user_key(iss, sub), now)
        except StoreError as exc:
            await self._refused(Operation.REVOKE, caller.name, Reason.STORE_ERROR, request.user)
            await self._unavailable(context, exc)
        await self._audit_quietly(
            grant_revoked(
                user=f"{iss}|{sub}",
                session="*",
                levels=(),
                revoked=n,
                actor=caller.name,
                reason=reason or Reason.API_REVOKE_USER,
            )
        )
        return sessions_pb2.RevokeUserResponse(sessions=n, revoked_before=now)

    async def ListSessions(
        self, request: sessions_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> sessions_pb2.ListSessionsResponse:
        caller = await self._caller(context, Operation.LIST, request.user)
        try:
            iss, sub = _user(request.user)
        except _Invalid as exc:
            await self._refused(Operation.LIST, caller.name, exc.slug, request.user)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from exc
        try:
            sessions = await self.store.list_sessions(user_key(iss, sub))
        except StoreError as exc:
            await self._refused(Operation.LIST, caller.name, Reason.STORE_ERROR, request.user)
            await self._unavailable(context, exc)
        log.info(
            "sessions API: sessions listed", extra={"actor": caller.name, "count": len(sessions)}
        )
        await self._audit_quietly(
            sessions_listed(user=f"{iss}|{sub}", caller=caller.name, count=len(sessions))
        )
        return sessions_pb2.ListSessionsResponse(sessions=[_session_pb(s) for s in sessions])

    async def _audit_quietly(self, event: AuditEvent) -> None:
        try:  # the call has happened: a failing audit sink must not hide that
            await self._emit(event)
        except Exception:
            log.exception("sessions API: audit record failed", extra={"type": event.type})

    async def _unavailable(self, context: grpc.aio.ServicerContext, exc: StoreError) -> NoReturn:
        log.warning("sessions API: store unavailable", extra={"error": str(exc)})
        await context.abort(grpc.StatusCode.UNAVAILABLE, "session store unavailable")
        raise AssertionError("unreachable") from exc


def add_to_server(servicer: SessionsServicer, server: grpc.aio.Server) -> None:
    sessions_pb2_grpc.add_SessionsServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
