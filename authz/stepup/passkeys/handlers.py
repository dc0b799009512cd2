"""The passkey endpoints on the step-up port (``add_routes``), under ``<prefix>/passkey``.

=======================================  ==================================================
``GET  /passkey?level&rd[&ctx][&tx]``    the step-up page (falls back to the IdP start)
``POST /passkey/authenticate/options``   a challenge for this session and browser
``POST /passkey/authenticate/verify``    the assertion -> a grant (``core.grants``)
``GET  /passkey/keys``                   the user's credentials; add and remove
``POST /passkey/register/options``       an enrolment challenge (fresh step-up required)
``POST /passkey/register/verify``        the attestation -> a credential
``POST /passkey/keys/remove``            remove one of the user's own credentials
``GET  /passkey/static/*``               the pages' stylesheet and script
=======================================  ==================================================

Who is asking is the access token (the same cookie or bearer the Check reads): every
ceremony is bound to that session (the session key is in the challenge state and must match
at verification) and to this browser (the state id travels only in an HttpOnly cookie).
State-changing requests are JSON POSTs whose ``Origin`` must be an allowed origin (a
cross-site form cannot send them). Every failure is a deny with a reason slug, a decision id
(shown to the user, in the metric and in the audit record) and a way back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from authz.audit.sinks import Auditor
from authz.config.settings import Settings
from authz.errors import StoreError
from authz.ops.metrics import Metrics
from authz.stepup.link import ContextSigner
from authz.stepup.passkeys import pages
from authz.stepup.passkeys.attestation import mds_from_settings
from authz.stepup.passkeys.base import (
    AuditorBridge,
    PasskeyAudit,
    PolicySource,
    Refusal,
    Tokens,
    relying_party,
)
from authz.stepup.passkeys.enrolment import EnrolmentHandlers
from authz.stepup.passkeys.links import LinkSigner
from authz.stepup.passkeys.stepup import StepupHandlers
from authz.store.credentials import (
    Durability,
    RedisCredentialStore,
)
from authz.store.sessions import RedisSessionStore

__all__ = [
    "AuditorBridge",
    "PasskeyAudit",
    "PasskeyRoutes",
    "Refusal",
    "add_routes",
    "build_passkey_routes",
    "credential_store",
    "relying_party",
]

log = logging.getLogger("authz.passkeys")


class PasskeyRoutes(StepupHandlers, EnrolmentHandlers):
    """Every passkey endpoint, built once from the service's parts (see ``add_routes``)."""

    # -- wiring ---------------------------------------------------------------------------

    async def startup(self) -> Durability | None:
        """The start-up check of the credential Redis (logged; kept for enrolment)."""
        try:
            self.durability = await self.store.durability()
        except StoreError as exc:
            log.warning("passkeys: cannot check the credential store", extra={"error": str(exc)})
            self.durability = None
            return None
        if not self.durability.ok:
            action = "enrolment is refused" if self.pk.durability == "refuse" else "WARNING"
            log.warning(
                "passkeys: the Redis holding credentials is not durable (%s): %s",
                action,
                "; ".join(self.durability.problems),
            )
        if self.mds is not None and not self.mds.verified:
            log.warning(
                "passkeys: FIDO MDS statements from %s are not signature-verified here "
                "(set passkeys.mds.blob_file for a signed BLOB)",
                self.mds.source,
            )
        return self.durability

    def add_to(self, app: web.Application) -> None:
        b = self.base
        app.router.add_get(b, self.stepup_page)
        app.router.add_post(f"{b}/authenticate/options", self.authenticate_options)
        app.router.add_post(f"{b}/authenticate/verify", self.authenticate_verify)
        app.router.add_get(f"{b}/keys", self.keys_page)
        app.router.add_post(f"{b}/register/options", self.register_options)
        app.router.add_post(f"{b}/register/verify", self.register_verify)
        app.router.add_post(f"{b}/keys/remove", self.remove)
        app.router.add_get(f"{b}/static/{{name}}", self.static_file)

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        types = {"passkey.js": "text/javascript", "passkey.css": "text/css"}
        if name not in types:
            raise web.HTTPNotFound()
        return web.Response(
            body=pages.static_file(name),
            content_type=types[name],
            headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
        )


def credential_store(
    client: Any, settings: Settings, sessions: RedisSessionStore, metrics: Metrics
) -> RedisCredentialStore:
    """The credential registry and transaction grants in the session store's Redis, under
    its prefix, deadline and keyring: what the passkey pages write and the Check takes."""
    return RedisCredentialStore(
        client,
        prefix=settings.redis.key_prefix,
        deadline_ms=settings.redis.deadline_ms,
        cipher=sessions.cipher,
        max_credentials=settings.passkeys.max_credentials,
        on_corrupt=metrics.corrupt_grants.inc,
    )


def build_passkey_routes(
    settings: Settings,
    *,
    policy: PolicySource,
    tokens: Tokens,
    client: Any,
    sessions: RedisSessionStore,
    metrics: Metrics,
    auditor: Auditor | None = None,
    signer: ContextSigner | None = None,
    links: LinkSigner | None = None,
    clock: Callable[[], float] = time.time,
) -> PasskeyRoutes:
    """Everything the passkey endpoints need, from the service's own parts: the Redis
    client and keyring of the session store, its grant writer, the step-up link signer and
    the auditor. ``links``: the signer the Check's redirects use for ``tx`` (needed when no
    ``stepup.context_key_file`` is set: a per-process key must be one object for both).
    Raises ConfigError for an MDS BLOB that does not verify."""
    store = credential_store(client, settings, sessions, metrics)
    return PasskeyRoutes(
        settings=settings,
        policy=policy,
        tokens=tokens,
        credentials=store,
        grants=sessions,
        metrics=metrics,
        links=links or LinkSigner.from_file(settings.stepup.context_key_file),
        signer=signer,
        mds=mds_from_settings(settings.passkeys.mds),
        audit=AuditorBridge(auditor) if auditor is not None else None,
        clock=clock,
    )


def add_routes(app: web.Application, routes: PasskeyRoutes) -> None:
    """Mount the passkey endpoints on the step-up port's application."""
    routes.add_to(app)
