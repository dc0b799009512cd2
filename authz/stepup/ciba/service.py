"""The push step-up built from the settings: what the composition root calls."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from authz.audit.sinks import AuditTrail
from authz.check.devices import DeviceResolver
from authz.check.tokens import AccessTokenVerifier
from authz.config.policy_file import PolicyHolder
from authz.config.settings import Settings
from authz.core.ids import new_id
from authz.core.reasons import Reason
from authz.errors import ConfigError
from authz.ops.metrics import Metrics
from authz.stepup.ciba.backchannel import BackchannelClient
from authz.stepup.ciba.flow import BackchannelIdTokens, CibaFlow
from authz.stepup.ciba.handlers import CibaRoutes
from authz.stepup.ciba.poller import CibaPoller
from authz.stepup.oidc import ProviderMetadata
from authz.stepup.profiles import IdpProfile
from authz.store.ciba import RedisCibaStore
from authz.store.crypto import FieldCipher
from authz.store.interfaces import CheckStore, GrantStore

STORE_DEADLINE_MS = 1000

log = logging.getLogger("authz.stepup.ciba")


@dataclass
class CibaService:
    routes: CibaRoutes
    poller: CibaPoller

    def add_routes(self, app: web.Application) -> None:
        self.routes.add_routes(app)

    def start(self) -> None:
        self.poller.start()

    async def aclose(self) -> None:
        await self.poller.aclose()


class CibaSlot:
    """The push step-up's routes from the start; the service behind them once the IdP's
    discovery document is in (``fill``). Until then (or when the IdP cannot serve CIBA
    after all, which is logged) a client is told ``idp-unavailable`` with a reference,
    and the refusal is logged with it. Off (``enabled`` false): no routes."""

    def __init__(
        self, prefix: str, *, enabled: bool, clock: Callable[[], float] = time.time
    ) -> None:
        self.prefix = prefix
        self.enabled = enabled
        self.clock = clock
        self.service: CibaService | None = None

    def add_routes(self, app: web.Application) -> None:
        if self.enabled:
            app.router.add_post(f"{self.prefix}/ciba", self.start)
            app.router.add_get(f"{self.prefix}/ciba/{{request_id}}", self.status)

    def fill(self, service: CibaService | None) -> None:
        if service is not None:
            service.start()
        self.service = service

    def _unavailable(self) -> web.Response:
        reference = new_id(int(self.clock() * 1000))
        log.warning(
            "push step-up refused",
            extra={"decision_id": reference, "reason": Reason.IDP_UNAVAILABLE},
        )
        return web.json_response(
            {
                "error": "unavailable",
                "reason": str(Reason.IDP_UNAVAILABLE),
                "detail": "the identity provider has not answered yet; retry later",
                "reference": reference,
            },
            status=503,
            headers={"Cache-Control": "no-store", "Retry-After": "5"},
        )

    async def start(self, request: web.Request) -> web.Response:
        if self.service is None:
            return self._unavailable()
        return await self.service.routes.start(request)

    async def status(self, request: web.Request) -> web.Response:
        if self.service is None:
            return self._unavailable()
        return await self.service.routes.status(request)

    async def aclose(self) -> None:
        if self.service is not None:
            await self.service.aclose()


def backchannel_endpoint(
    settings: Settings, metadata: ProviderMetadata, profile: IdpProfile
) -> str:
    """Where backchannel requests go; ConfigError when CIBA cannot work with this IdP."""
    if not profile.ciba:
        raise ConfigError(
            f"the {profile.name} profile's IdP offers no OpenID CIBA (docs/idp/{profile.name}.md)",
            location="ciba.enabled",
        )
    endpoint = settings.ciba.endpoint or metadata.backchannel_authentication_endpoint
    if endpoint is None:
        raise ConfigError(
            "the IdP's discovery document names no backchannel_authentication_endpoint; "
            "set ciba.endpoint or turn CIBA off",
            location="ciba.endpoint",
        )
    modes = metadata.backchannel_token_delivery_modes
    if modes and "poll" not in modes:
        raise ConfigError(
            f"the IdP delivers CIBA tokens by {', '.join(modes)} only; the service polls",
            location="ciba.enabled",
        )
    return endpoint


def build_ciba(
    settings: Settings,
    *,
    metadata: ProviderMetadata,
    profile: IdpProfile,
    http: aiohttp.ClientSession,
    access_tokens: AccessTokenVerifier,
    id_tokens: BackchannelIdTokens,
    redis: Redis,
    cipher: FieldCipher,
    sessions: CheckStore,
    grants: GrantStore,
    policy: PolicyHolder,
    metrics: Metrics,
    auditor: AuditTrail | None,
    devices: DeviceResolver | None,
    clock: Callable[[], float] = time.time,
) -> CibaService | None:
    """The routes and the poller, or None when ``ciba.enabled`` is off."""
    c = settings.ciba
    if not c.enabled:
        return None
    oidc = settings.oidc
    backchannel = BackchannelClient(
        endpoint=backchannel_endpoint(settings, metadata, profile),
        token_endpoint=metadata.token_endpoint,
        client_id=oidc.client_id,
        client_secret=oidc.secret(),
        session=http,
        timeout_s=oidc.http_timeout_s,
    )
    flow = CibaFlow(
        settings=c,
        profile=profile,
        policy=policy,
        access_tokens=access_tokens,
        id_tokens=id_tokens,
        backchannel=backchannel,
        requests=RedisCibaStore(
            redis,
            prefix=settings.redis.key_prefix,
            # Off the Check path (nothing waits on Envoy's ext_authz timeout here): a
            # loaded Redis gets a second, not the Check's budget of a few milliseconds.
            deadline_ms=max(settings.redis.deadline_ms, STORE_DEADLINE_MS),
            cipher=cipher,
            on_corrupt=metrics.corrupt_grants.inc,
        ),
        grants=grants,
        sessions=sessions,
        metrics=metrics,
        auditor=auditor,
        leeway_s=oidc.leeway_s,
        default_grant_ttl_s=settings.stepup.default_grant_ttl_s,
        lease_ms=int((oidc.http_timeout_s + 5) * 1000),
        clock=clock,
    )
    poller = CibaPoller(
        flow.poll_if_due,
        max_pending=c.max_pending,
        max_inflight=c.max_inflight_polls,
        max_expiry_s=c.max_expiry_s,
        clock=clock,
    )
    flow.schedule = poller.add
    flow.has_room = poller.has_room
    routes = CibaRoutes(
        flow,
        path_prefix=settings.stepup.path_prefix,
        peer_header=settings.stepup.peer_header,
        devices=devices,
        clock=clock,
    )
    return CibaService(routes, poller)
