"""Enrolment and the user's own credentials: the keys page, registration, removal.

Adding or removing a credential needs a step-up at or above ``passkeys.enrol_level`` within
``passkeys.enrol_window_s`` (an IdP step-up, the token's own fresh MFA, or a passkey one).
The enrolment record reaches the audit trail before the credential reaches the registry, so
the archive can always rebuild what the registry holds.
"""

from __future__ import annotations

import logging
import os
import secrets
from urllib.parse import urlencode

from aiohttp import web

from authz.audit.sinks import AuditUnavailable
from authz.check.devices import DeviceCookies
from authz.core.encoding import b64u, unb64u
from authz.core.reasons import Reason
from authz.errors import StoreError
from authz.stepup.endpoints import safe_return_path
from authz.stepup.passkeys import attestation, ceremonies, pages, records, rules
from authz.stepup.passkeys.attestation import PasskeyRefused
from authz.stepup.passkeys.base import NAME_MAX, PasskeyBase, Refusal, Who
from authz.store.credentials import Credential

log = logging.getLogger("authz.passkeys")


class EnrolmentHandlers(PasskeyBase):
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
                # The device cookie is the service's own (a MAC'd value): its id, or none.
                cookies = DeviceCookies(
                    self.signer.derived_key(), self.s.cookie(self.settings.devices.cookie or "")
                )
                device = cookies.from_header(request.headers.get("Cookie", ""))
                ctx = self.signer.sign(
                    level=enrol.name,
                    session_key=who.sk,
                    device=device,
                    ip=None,
                    now=self._now(),
                )
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
            if not name or len(name) > NAME_MAX or any(ord(c) < 0x20 for c in name):
                raise Refusal(400, Reason.BAD_REQUEST, f"a name of 1 to {NAME_MAX} characters")
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
        self._count(kind, Reason.SUCCESS, None)
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
        self._count(kind, Reason.SUCCESS, None)
        self.metrics.passkey_credentials.labels(op="removed").inc()
        return self._json({"ok": True, "decision_id": decision_id})
