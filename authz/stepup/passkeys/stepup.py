"""The step-up page and the authentication ceremony: challenge, assertion, grant.

A successful assertion becomes a grant only through ``authz.core.grants.grant_for``, with the
level's ``passkey_acr`` and RFC 8176 ``amr``; a transaction-bound level gets a single-use
grant for the request digest instead of a time-window grant for the level.
"""

from __future__ import annotations

import logging
import os
import secrets
from urllib.parse import quote, urlencode

from aiohttp import web

from authz.audit.sinks import AuditUnavailable
from authz.core.encoding import b64u, unb64u
from authz.core.grants import GrantRefused, Proof, Target, grant_for
from authz.core.reasons import Reason
from authz.core.session import Evidence
from authz.errors import StoreError
from authz.stepup.endpoints import safe_return_path
from authz.stepup.passkeys import ceremonies, pages, records, rules
from authz.stepup.passkeys.attestation import PasskeyRefused
from authz.stepup.passkeys.base import MESSAGES, PasskeyBase, Refusal
from authz.store.credentials import TransactionGrant, with_use

log = logging.getLogger("authz.passkeys")


class StepupHandlers(PasskeyBase):
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
            self._context(level, ctx, now, who.sk)  # checked here; bound into the grant later
            tx = self._transaction(level, tx_token, now, who.sk)
        except Refusal as exc:
            detail = MESSAGES.get(exc.reason) or "It has expired. Go back and try again."
            return self._error_page(400, "This step-up link cannot be used", detail, rd)
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
        view = pages.StepupView(
            level_label=level.label,
            route_label=self._why(level, rd, tx),
            return_to=rd,
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
            device, ip = self._context(level, str(body.get("ctx") or ""), now, who.sk)
            tx = self._transaction(level, str(body.get("tx") or ""), now, who.sk)
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
                            outcome=Reason.SUCCESS,
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
        self._count(kind, Reason.SUCCESS, level.name)
        self.metrics.completions.labels(
            level=level.name, result=Reason.SUCCESS, factor="passkey"
        ).inc()
        log.info(
            "passkey step-up granted",
            extra={
                "decision_id": decision_id,
                "stepup_level": level.name,
                "amr": list(grant.evidence.amr),
                "expires_at": grant.expires_at,
            },
        )
        answer: dict[str, object] = {"redirect": state["rd"], "decision_id": decision_id}
        if level.transaction is not None:
            # A redirect cannot replay the request (a POST): the page keeps the approved
            # action in view and sends the user back to submit it, within the grant's life.
            answer["approved"] = (
                "Approved. Go back and submit it again within "
                f"{max(0, grant.expires_at - now)} seconds: the approval is for that request, once."
            )
        resp = self._json(answer)
        resp.del_cookie(self.cookie, path="/")
        return resp
