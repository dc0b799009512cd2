"""The rest of a push step-up: its status for the session that started it, the polls,
and the one outcome each request gets (the grant an approval earns)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import secrets

from authz.audit import mapping
from authz.audit.sinks import AuditUnavailable
from authz.core.grants import GrantRefused, Proof, Target, grant_for
from authz.core.reasons import Reason
from authz.core.session import Evidence
from authz.errors import KeysUnavailable, StoreError, TokenError
from authz.stepup.ciba.backchannel import Polled, PollResult
from authz.stepup.ciba.base import SLOW_DOWN_S, Caller, FlowBase, Who, audit_id, log
from authz.stepup.ciba.request import (
    REQUEST_ID,
    CibaRequest,
    Status,
)
from authz.stepup.profiles import missing_evidence


class OutcomeFlow(FlowBase):
    # -- status and polling ---------------------------------------------------------------

    async def status(self, request_id: str, caller: Caller) -> CibaRequest:
        """The caller's own request, polled first when a poll is due; CibaRefused 404 for
        an unknown id and for another session's (the two are not told apart)."""
        if not REQUEST_ID.fullmatch(request_id):
            raise self._refuse(404, Reason.CIBA_UNKNOWN, "no such request", audited=False)
        try:
            record = await self._load(request_id)
        except StoreError as exc:
            raise self._refuse(503, Reason.STORE_ERROR, str(exc), audited=False) from None
        if record is None:
            raise self._refuse(404, Reason.CIBA_UNKNOWN, "no such request", audited=False)
        if record.session_key != caller.session_key:
            # Someone holding another session's token probing this id: say "unknown", and
            # leave a record of who tried.
            raise self._refuse(
                404,
                Reason.CIBA_OTHER_SESSION,
                "no such request",
                Who(caller.identity.user, caller.session_key, record.level),
                shown=Reason.CIBA_UNKNOWN,
            )
        try:
            current, _ = await self._poll_loaded(request_id, record)
        except StoreError as exc:
            raise self._refuse(503, Reason.STORE_ERROR, str(exc), audited=False) from None
        return current

    async def poll_if_due(self, request_id: str) -> tuple[CibaRequest | None, bool]:
        """Poll the IdP for ``request_id`` if a poll is due and no one else is polling it:
        (the record as it is now, whether this call polled)."""
        record = await self._load(request_id)
        if record is None:
            return None, False
        return await self._poll_loaded(request_id, record)

    async def _poll_loaded(self, request_id: str, record: CibaRequest) -> tuple[CibaRequest, bool]:
        if record.ended:
            return record, False
        now = self.clock()
        if now >= record.expires_at:
            return await self._end(request_id, record, Status.EXPIRED, Reason.CIBA_EXPIRED), False
        if now < record.next_poll_at:
            return record, False
        holder = secrets.token_hex(8)
        if not await self.requests.lease(request_id, holder, self.lease_ms):
            return record, False
        try:
            result = await self.backchannel.poll(record.auth_req_id)
            return await self._after_poll(request_id, record, result), True
        finally:
            with contextlib.suppress(StoreError):
                await self.requests.release(request_id, holder)

    async def _after_poll(
        self, request_id: str, record: CibaRequest, result: PollResult
    ) -> CibaRequest:
        answered = math.ceil(self.clock())
        outcome = result.outcome
        if outcome is Polled.TOKENS:
            return await self._approve(request_id, record, result)
        if outcome is Polled.DENIED:
            return await self._end(
                request_id, record, Status.DENIED, Reason.CIBA_DENIED, idp_error=result.error
            )
        if outcome is Polled.EXPIRED:
            return await self._end(
                request_id, record, Status.EXPIRED, Reason.CIBA_EXPIRED, idp_error=result.error
            )
        if outcome is Polled.REFUSED:
            return await self._end(
                request_id, record, Status.FAILED, Reason.IDP_ERROR, idp_error=result.error
            )
        if outcome is Polled.SLOW_DOWN:
            interval = record.interval + SLOW_DOWN_S
            nxt = dataclasses.replace(
                record, interval=interval, next_poll_at=answered + interval, failures=0
            )
        elif outcome is Polled.UNAVAILABLE:
            failures = record.failures + 1
            wait = max(record.interval, min(self.s.max_interval_s, record.interval * 2**failures))
            log.warning(
                "CIBA poll: the IdP did not answer", extra={"error": result.error, "retry_in": wait}
            )
            nxt = dataclasses.replace(record, next_poll_at=answered + wait, failures=failures)
        else:  # authorization_pending
            nxt = dataclasses.replace(record, next_poll_at=answered + record.interval, failures=0)
        await self.requests.save(request_id, nxt.to_json(), self._ttl(nxt, answered))
        return nxt

    # -- the outcome ----------------------------------------------------------------------

    async def _approve(
        self, request_id: str, record: CibaRequest, result: PollResult
    ) -> CibaRequest:
        now = int(self.clock())
        try:
            token = await self.id_tokens.verify_backchannel_id_token(
                str(result.tokens["id_token"]), now, auth_req_id=record.auth_req_id
            )
        except KeysUnavailable as exc:
            return await self._end(request_id, record, Status.FAILED, exc.reason, error=str(exc))
        except TokenError as exc:
            return await self._end(
                request_id, record, Status.FAILED, Reason.TOKEN_REJECTED, error=str(exc)
            )
        level = self.policy.current.policy.by_name.get(record.level)
        # "Same user" is the profile's claim pair: the ID token's claim that must equal the
        # access token's user (Okta: its `sub` against the access token's `uid`).
        proved = token.claims.get(self.profile.subject_claims[1])
        target = Target(record.issuer, record.subject, device=record.device, ip=record.ip)
        proof = Proof(
            token.issuer,
            proved if isinstance(proved, str) else "",
            token.evidence,
            challenged_at=record.issued_at,
            device=record.device,
            ip=record.ip,
        )
        try:
            grant = grant_for(
                level,
                target,
                proof,
                now=now,
                leeway=self.leeway_s,
                default_ttl_s=self.default_grant_ttl_s,
            )
        except GrantRefused as exc:
            missing: tuple[str, ...] = ()
            if level is not None:
                missing = missing_evidence(
                    token.evidence, acr=level.acr, amr_any=level.amr_any, max_age=level.max_age
                )
            detail = f"the ID token has no {', '.join(missing)}" if missing else exc.detail
            return await self._end(
                request_id,
                record,
                Status.FAILED,
                exc.reason,
                error=detail or None,
                evidence=token.evidence,
            )
        if not await self.requests.once(f"end:{request_id}", self._marker_ttl()):
            return await self._load(request_id) or record
        if not await self.requests.once(
            f"grant:{audit_id(record.auth_req_id)}", self._marker_ttl()
        ):
            return await self._finish(record, request_id, Status.FAILED, Reason.CIBA_REPLAYED)
        if self.auditor is not None:
            try:
                # Audit before grant: no grant exists without its durable record.
                await self.auditor.durable(
                    mapping.ciba_completed(
                        level=record.level,
                        user=f"{record.issuer}|{record.subject}",
                        session=record.session_key,
                        request_id=audit_id(record.auth_req_id),
                        acr=token.evidence.acr,
                        amr=token.evidence.amr,
                        auth_time=token.evidence.auth_time,
                        issuer=token.issuer,
                        grant_expires_at=grant.expires_at,
                        route=record.route,
                        device=record.device,
                        client_ip=record.ip,
                        policy_version=self.policy.current.version,
                        ts_ms=int(self.clock() * 1000),
                    )
                )
            except AuditUnavailable:
                return await self._finish(
                    record, request_id, Status.FAILED, Reason.AUDIT_UNAVAILABLE
                )
        try:
            # The push proved the user, not the client's device: it does not make the
            # device "known" (remember_device), which a browser step-up does.
            await self.grants.write_grant(
                record.user_key, record.session_key, grant, now, remember_device=False
            )
        except (StoreError, ValueError) as exc:
            self.metrics.redis_errors.labels(op="write").inc()
            return await self._finish(
                record, request_id, Status.FAILED, Reason.STORE_ERROR, error=str(exc)
            )
        approved = dataclasses.replace(
            record, status=Status.APPROVED, reason=Reason.SUCCESS, grant_expires_at=grant.expires_at
        )
        await self._store_end(request_id, approved)
        self._count("approved", Reason.SUCCESS, record.level)
        log.info(
            "push step-up approved",
            extra={
                "stepup_level": record.level,
                "acr": token.evidence.acr,
                "expires_at": grant.expires_at,
            },
        )
        return approved

    async def _end(
        self,
        request_id: str,
        record: CibaRequest,
        status: Status,
        reason: Reason,
        *,
        idp_error: str | None = None,
        error: str | None = None,
        evidence: Evidence | None = None,
    ) -> CibaRequest:
        """End the request with this outcome, unless another one was written first."""
        if not await self.requests.once(f"end:{request_id}", self._marker_ttl()):
            return await self._load(request_id) or record
        return await self._finish(
            record, request_id, status, reason, idp_error=idp_error, error=error, evidence=evidence
        )

    async def _finish(
        self,
        record: CibaRequest,
        request_id: str,
        status: Status,
        reason: Reason,
        *,
        idp_error: str | None = None,
        error: str | None = None,
        evidence: Evidence | None = None,
    ) -> CibaRequest:
        ended = dataclasses.replace(record, status=status, reason=str(reason))
        if self.auditor is not None:
            self.auditor.emit(
                mapping.ciba_failed(
                    reason=reason,
                    level=record.level,
                    user=f"{record.issuer}|{record.subject}",
                    session=record.session_key,
                    request_id=audit_id(record.auth_req_id),
                    idp_error=idp_error,
                    acr=evidence.acr if evidence is not None else None,
                    amr=evidence.amr if evidence is not None else (),
                    auth_time=evidence.auth_time if evidence is not None else None,
                    error=error,
                    route=record.route,
                    client_ip=record.ip,
                    device=record.device,
                    ts_ms=int(self.clock() * 1000),
                )
            )
        self._count(status.value, reason, record.level)
        log.warning(
            "push step-up ended",
            extra={"stepup_level": record.level, "status": status.value, "reason": reason},
        )
        await self._store_end(request_id, ended)
        return ended

    async def _store_end(self, request_id: str, ended: CibaRequest) -> None:
        """Keep the outcome readable for ``result_ttl_s``; free the session's slot."""
        with contextlib.suppress(StoreError):
            await self.requests.save(request_id, ended.to_json(), self.s.result_ttl_s)
        with contextlib.suppress(StoreError):
            await self.requests.release_slot(ended.session_key, request_id)
