"""Composition root: build every part from Settings, run gRPC and HTTP on one event loop,
reload the policy on file change or SIGHUP, shut down gracefully on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from authz.admin.api import SERVICE_NAME as SESSIONS_SERVICE
from authz.admin.api import SessionsServicer
from authz.admin.api import add_to_server as add_sessions_api
from authz.admin.auth import Callers
from authz.admin.proofs import ProofVerifier
from authz.audit.mapping import policy_reload
from authz.audit.metrics import AuditMetrics
from authz.audit.service import build_auditor
from authz.audit.sinks import Auditor
from authz.check.authorizer import Authorizer
from authz.check.devices import CertificateTrust, DeviceCookies, DeviceResolver
from authz.check.geoip import GeoIP
from authz.check.grpc_server import AuthorizationServicer, GrpcServer
from authz.check.http_server import HttpAuthzServer, maybe_start
from authz.check.introspection import AccessTokens, introspector_for
from authz.check.redirects import Redirects
from authz.check.response import HttpResponseBuilder, ResponseBuilder
from authz.check.tokens import TokenVerifier, key_source_from_settings
from authz.config.policy_file import LoadedPolicy, PolicyHolder
from authz.config.settings import OidcSettings, Settings
from authz.core.policy import Policy
from authz.errors import ConfigError
from authz.evidence.monitor import CoverageMonitor
from authz.ops.degraded import Backoff, StoreWatch
from authz.ops.health import Health
from authz.ops.metrics import Metrics
from authz.ops.metrics_listener import start_metrics_listener
from authz.ops.tls import server_context
from authz.stepup.ciba.service import CibaSlot, build_ciba
from authz.stepup.endpoints import StepupApp
from authz.stepup.link import ContextSigner
from authz.stepup.logout import LogoutApp
from authz.stepup.oidc import OidcClient, ProviderMetadata
from authz.stepup.passkeys.handlers import add_routes as add_passkey_routes
from authz.stepup.passkeys.handlers import build_passkey_routes, credential_store
from authz.stepup.passkeys.links import LinkSigner
from authz.stepup.provider import IdpConnection
from authz.store.connections import EmbeddedValkey, SentinelWatcher, make_redis
from authz.store.crypto import cipher_from_settings
from authz.store.fastredis import make_fast_redis
from authz.store.sessions import RedisSessionStore, StoreLimits

log = logging.getLogger("authz.app")


@dataclass
class Service:
    """A running service; ``stop()`` releases everything in reverse order."""

    settings: Settings
    metrics: Metrics
    policy: PolicyHolder
    authorizer: Authorizer
    grpc: GrpcServer
    stepup: StepupApp
    health: Health
    http_runner: web.AppRunner
    http_port: int
    http_authz: HttpAuthzServer | None = None
    api: GrpcServer | None = None
    _closers: list[object] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    metrics_runner: web.AppRunner | None = None  # /metrics on its own port (metrics.port)

    @property
    def grpc_port(self) -> int:
        return int(self.grpc.port)

    @property
    def api_port(self) -> int | None:
        return int(self.api.port) if self.api is not None else None

    @property
    def metrics_port(self) -> int | None:
        if self.metrics_runner is None:
            return None
        return int(self.metrics_runner.addresses[0][1])

    async def _watch_policy(self) -> None:
        while True:
            await asyncio.sleep(self.settings.policy_poll_s)
            if self.policy.changed():
                self.policy.reload()

    async def stop(self) -> None:
        self.health.accepting = False  # /readyz fails first so load balancers drain us
        for task in self._tasks:
            task.cancel()
        await self.authorizer.drain()
        if self.http_authz is not None:
            await self.http_authz.stop(self.settings.http_authz.shutdown_grace_s)
        if self.api is not None:
            await self.api.stop()
        await self.grpc.stop()
        await self.http_runner.cleanup()
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
        await _close_all(self._closers)


async def _device_resolver(
    settings: Settings,
    http: aiohttp.ClientSession,
    closers: list[object],
    signer: ContextSigner,
) -> DeviceResolver:
    d = settings.devices
    cookies = None
    if d.cookie:
        cookies = DeviceCookies(signer.derived_key(), settings.stepup.cookie(d.cookie))
    certificates = None
    if d.certificate_ca_file is not None:
        certificates = CertificateTrust(d.certificate_ca_file)
    a = d.assertion
    if a is None:
        return DeviceResolver(cookies=cookies, certificates=certificates)
    # Assertions are JWTs from the device-trust service, verified with its own keys.
    oidc_like = OidcSettings(
        issuer=a.issuer,
        client_id="device-assertions",
        audience=a.audience,
        algorithms=a.algorithms,
        jwks_url=a.jwks_url,
        jwks_file=a.jwks_file,
        token_typ=None,
        token_cache_size=0,
    )
    keys = key_source_from_settings(oidc_like, http)
    closers.append(keys)
    await keys.start()
    return DeviceResolver(
        cookies=cookies,
        certificates=certificates,
        assertion_header=a.header,
        assertions=TokenVerifier(oidc_like, keys),
        assertion_audience=a.audience,
        assertion_max_lifetime_s=a.max_lifetime_s,
    )


async def _sessions_api(
    settings: Settings,
    store: RedisSessionStore,
    policy: PolicyHolder,
    auditor: Auditor | None,
    closers: list[object],
    clock: Callable[[], float] = time.time,
) -> GrpcServer | None:
    """The Sessions API on its own listener (``api.port``), or None when it is off."""
    api = settings.api
    if not api.enabled:
        return None
    proofs: dict[str, ProofVerifier] = {}
    for caller in api.callers:
        if caller.proof is not None:
            verifier = ProofVerifier(caller, api, leeway_s=settings.oidc.leeway_s)
            await verifier.start()
            closers.append(verifier)
            proofs[caller.name] = verifier
    servicer = SessionsServicer(
        store,
        levels=lambda name: policy.current.policy.by_name.get(name),
        callers=Callers.from_settings(api.callers),
        proofs=proofs,
        idp_issuers=frozenset({settings.oidc.issuer}),
        audit=auditor.durable if auditor is not None else None,
        clock=clock,
        leeway=settings.oidc.leeway_s,
        default_grant_ttl_s=settings.stepup.default_grant_ttl_s,
    )
    server = GrpcServer(
        host=api.host,
        port=api.port,
        services=[(SESSIONS_SERVICE, lambda s: add_sessions_api(servicer, s))],
        tls=api.tls,
        reflection_on=api.reflection,
        shutdown_delay_s=settings.grpc.shutdown_delay_s,
        shutdown_grace_s=settings.grpc.shutdown_grace_s,
    )
    log.info("Sessions API listening", extra={"address": f"{api.host}:{server.port}"})
    return server


def _service_cookies(settings: Settings) -> tuple[str, ...]:
    """Cookies that carry a credential of this service's (or one the operator names): they
    are removed from what Envoy forwards to the upstream."""
    s = settings.stepup
    names = [s.cookie(settings.oidc.token_cookie), s.cookie(s.state_cookie)]
    if settings.devices.cookie:
        names.append(s.cookie(settings.devices.cookie))
    names += settings.oidc.credential_cookies
    if settings.passkeys.enabled:  # the ceremony's state id (authz/stepup/passkeys/base.py)
        names.append(s.cookie(settings.passkeys.cookie))
    return tuple(dict.fromkeys(names))


def _warn_about(settings: Settings) -> None:
    if settings.oidc.sid_fallback_claim is not None:
        log.warning(
            "oidc.sid_fallback_claim is set: tokens without `sid` that share the claim "
            "%r are one session, so one step-up elevates all of them on every device",
            settings.oidc.sid_fallback_claim,
        )


def _where(url: str | None) -> str:
    """host:port of a store URL, for log lines (never its password)."""
    if url is None:
        return "sentinel"
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.hostname else parts.scheme


def _access_tokens(
    settings: Settings, tokens: TokenVerifier, http: aiohttp.ClientSession
) -> AccessTokens:
    """The Check's and the step-up endpoints' access-token verifier: the JWT verifier, and
    RFC 7662 introspection when ``oidc.introspection`` is set (its endpoint now when
    configured, else pending until discovery names it)."""
    conf = settings.oidc.introspection
    if conf is None:
        return AccessTokens(tokens, None)
    if conf.endpoint is None:
        return AccessTokens(tokens, None, pending=True)
    try:
        return AccessTokens(tokens, introspector_for(settings.oidc, tokens, http, conf.endpoint))
    except ValueError as exc:
        raise ConfigError(str(exc), location="oidc.introspection.endpoint") from exc


def _uses_countries(policy: Policy) -> bool:
    return any(r.country_in or r.country_not_in for r in policy.rules)


async def _close_all(closers: list[object]) -> None:
    for closer in reversed(closers):
        with contextlib.suppress(Exception):
            if isinstance(closer, EmbeddedValkey):
                await asyncio.to_thread(closer.stop)
            elif isinstance(closer, aiohttp.ClientSession):
                await closer.close()
            else:
                await closer.aclose()  # type: ignore[attr-defined]


def _policy_hook(metrics: Metrics, auditors: list[Auditor]):  # type: ignore[no-untyped-def]
    def on_reload(
        result: str, old: LoadedPolicy | None, new: LoadedPolicy | None, error: str
    ) -> None:
        metrics.policy_reloads.labels(result=result).inc()
        for auditor in auditors:  # empty until the auditor exists (the initial load)
            auditor.emit(
                policy_reload(
                    result=result,
                    old_sha256=old.sha256 if old else None,
                    new_sha256=new.sha256 if new else None,
                    version=new.version if new else None,
                    error=error or None,
                )
            )
        if new is not None:
            metrics.policy_info.info({"version": new.version, "sha256": new.sha256})
            log.info(
                "policy reloaded",
                extra={
                    "old_sha256": old.sha256 if old else None,
                    "new_sha256": new.sha256,
                    "version": new.version,
                },
            )
        else:
            log.error("policy reload refused; keeping the last good policy", extra={"error": error})

    return on_reload


async def start_service(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
) -> Service:
    """Start every listener. ``clock`` is the wall clock every freshness and expiry
    decision reads (the Check, step-up links, the callback, the Sessions API); tests inject
    it to move time."""
    metrics = metrics or Metrics()
    _warn_about(settings)
    closers: list[object] = []
    auditors: list[Auditor] = []
    try:
        policy = PolicyHolder(settings.policy_file, on_reload=_policy_hook(metrics, auditors))
        loaded = policy.current
        metrics.policy_info.info({"version": loaded.version, "sha256": loaded.sha256})

        redis_url = settings.redis.url
        if settings.redis.embedded:
            embedded = EmbeddedValkey()
            redis_url = await asyncio.to_thread(embedded.start)
            closers.append(embedded)
            log.info("no REDIS_URL: started an embedded Valkey server", extra={"url": redis_url})
        client = make_redis(settings.redis, redis_url)
        fast = make_fast_redis(settings.redis, redis_url)
        if fast is not None:
            closers.append(fast)
        st = settings.state
        store = RedisSessionStore(
            client,
            prefix=settings.redis.key_prefix,
            deadline_ms=settings.redis.deadline_ms,
            limits=StoreLimits(
                session_ttl_s=st.session_ttl_s,
                revocation_ttl_s=st.revocation_ttl_s,
                history_ttl_s=st.history_ttl_s,
                max_sessions=st.max_sessions,
                max_devices=st.max_devices,
                max_ips=st.max_ips,
            ),
            on_corrupt=metrics.corrupt_grants.inc,
            on_noscript=metrics.noscript.inc,
            cipher=cipher_from_settings(settings.crypto),
            script_client=fast,
        )
        closers.append(store)
        if settings.redis.sentinel is not None:  # closed before the store (and its client)
            watcher = SentinelWatcher(client, settings.redis.sentinel.master_name)
            watcher.start()
            closers.append(watcher)

        # The browser step-up's own client and longer deadline: a sign-in waits on Redis,
        # not on Envoy's ext_authz timeout as the Check does.
        stepup_ms = settings.stepup.store_deadline_ms
        stepup_store = store.on_client(
            make_redis(settings.redis.model_copy(update={"deadline_ms": stepup_ms}), redis_url),
            deadline_ms=stepup_ms,
        )
        closers.append(stepup_store)

        # The audit trail's producer (MAC'd, sequenced records): authz/audit/service.py.
        auditor = build_auditor(settings, client, fast, AuditMetrics(metrics.registry), closers)
        if auditor is not None:
            auditors.append(auditor)

        backoff = Backoff(settings.oidc.start_retry_initial_s, settings.oidc.start_retry_max_s)
        store_watch = StoreWatch(client.ping, what=_where(redis_url), backoff=backoff)
        closers.append(store_watch)
        await store_watch.start()  # a warning, not a failure: the client reconnects itself

        http = aiohttp.ClientSession()
        closers.append(http)
        keys = key_source_from_settings(settings.oidc, http)
        closers.append(keys)
        tokens = TokenVerifier(settings.oidc, keys)
        metrics.token_cache.capacity(settings.oidc.token_cache_size)
        tokens.observe_cache(metrics.token_cache)
        # Access tokens: JWTs by their signature; opaque ones (an IdP's default, e.g. Ping's
        # reference tokens) by RFC 7662 introspection when oidc.introspection is set. Its
        # endpoint is configured or comes with discovery (then set once the IdP answers).
        access_tokens = _access_tokens(settings, tokens, http)
        # Discovery and the keys: started below, after the parts that wait for them exist;
        # an IdP that does not answer yet leaves the service up but not ready.
        idp = IdpConnection(
            issuer=settings.oidc.issuer,
            http=http,
            timeout_s=settings.oidc.http_timeout_s,
            keys=keys,
            backoff=backoff,
        )
        closers.append(idp)

        if settings.stepup.context_key_file is None:
            log.warning(
                "no stepup.context_key_file: a per-process key signs step-up links "
                "(fine for one replica; several replicas need a shared key)"
            )
        signer = ContextSigner.from_file(
            settings.stepup.context_key_file, settings.stepup.state_ttl_s
        )
        devices = await _device_resolver(settings, http, closers, signer)
        geoip = None
        if settings.network.geoip_database is not None:
            geoip = GeoIP(settings.network.geoip_database)
        elif _uses_countries(loaded.policy):
            log.warning(
                "the policy has country rules but no GeoIP database is configured: "
                "every country is unknown (untrusted)"
            )
        # The passkey pages' signer for ``tx`` and ``st`` (authz/stepup/passkeys/links.py):
        # one object for the Check's redirects and the pages, so a per-process key (no
        # context_key_file) still verifies; with the file, every replica derives the same.
        links = LinkSigner.from_file(settings.stepup.context_key_file)
        transactions = None
        if settings.passkeys.enabled:  # transaction-bound levels' grants, taken by the Check
            transactions = credential_store(client, settings, store, metrics)
        authorizer = Authorizer(
            policy=policy,
            tokens=access_tokens,
            store=store,
            metrics=metrics,
            token_cookie=settings.stepup.cookie(settings.oidc.token_cookie),
            leeway=settings.oidc.leeway_s,
            auditor=auditor,
            audit_level=settings.audit.durable_level,
            devices=devices,
            geoip=geoip,
            clock=clock,
            transactions=transactions,
        )
        redirects = Redirects(
            settings.stepup.path_prefix,
            signer,
            clock=clock,
            passkeys=settings.passkeys.enabled,
            links=links,
        )
        strip = _service_cookies(settings)
        responses = ResponseBuilder(
            error_status=settings.stepup.error_status, redirects=redirects, strip_cookies=strip
        )
        grpc_server = GrpcServer.for_ext_authz(
            settings.grpc,
            AuthorizationServicer(authorizer, responses, settings.grpc.peer_header),
        )
        api_server = await _sessions_api(settings, store, policy, auditor, closers, clock)
        coverage = CoverageMonitor.from_settings(settings, metrics)  # None without admin URLs
        if coverage is not None:
            coverage.start()
            closers.append(coverage)

        stepup = StepupApp(
            settings=settings,
            policy=policy,
            tokens=access_tokens,
            store=stepup_store,
            oidc=None,
            metrics=metrics,
            clock=clock,
            auditor=auditor,
            signer=signer,
            devices=devices,
        )

        def relying_party(provider: ProviderMetadata) -> None:
            stepup.oidc = OidcClient(
                metadata=provider,
                client_id=settings.oidc.client_id,
                client_secret=settings.oidc.secret(),
                redirect_uri=f"{settings.stepup.public_url}{settings.stepup.path_prefix}/callback",
                session=http,
                timeout_s=settings.oidc.http_timeout_s,
                profile=tokens.profile,
            )

        idp.on_ready(relying_party)
        if access_tokens.pending:

            def introspection(provider: ProviderMetadata) -> None:
                endpoint = provider.introspection_endpoint
                if endpoint is None:
                    log.error(
                        "oidc.introspection is set but the IdP's discovery document names no "
                        "introspection_endpoint: opaque access tokens stay refused; set "
                        "oidc.introspection.endpoint"
                    )
                    return
                try:
                    access_tokens.set_introspector(
                        introspector_for(settings.oidc, tokens, http, endpoint)
                    )
                except ValueError as exc:
                    log.error("introspection endpoint refused: %s", exc)

            idp.on_ready(introspection)
        health = Health(
            metrics=metrics,
            store_ok=store.ping,
            keys_ready=lambda: idp.ready,
            policy_loaded=lambda: policy.current is not None,
        )
        http_app = web.Application(client_max_size=64 * 1024)
        stepup.add_routes(http_app)
        logout = LogoutApp(
            settings=settings,
            logout_tokens=tokens,
            access_tokens=authorizer.tokens,
            store=store,
            auditor=auditor,
            clock=clock,
        )
        logout.add_routes(http_app)
        idp.on_ready(logout.set_metadata)  # the end_session_endpoint, once discovery is in
        health.add_routes(http_app, metrics=settings.metrics.port is None)
        await health.probe_store()  # the gauge from the start, not from the first probe
        # Push step-up (OpenID CIBA) for API clients: its token checked as the Check does.
        # Built once the IdP's discovery document is in; until then its routes say so.
        ciba_slot = CibaSlot(
            settings.stepup.path_prefix, enabled=settings.ciba.enabled, clock=clock
        )
        ciba_slot.add_routes(http_app)
        closers.append(ciba_slot)

        def push_stepup(provider: ProviderMetadata) -> None:
            ciba_slot.fill(
                build_ciba(
                    settings,
                    metadata=provider,
                    profile=tokens.profile,
                    http=http,
                    access_tokens=authorizer.tokens,
                    id_tokens=tokens,
                    redis=client,
                    cipher=store.cipher,
                    sessions=store,
                    grants=store,
                    policy=policy,
                    metrics=metrics,
                    auditor=auditor,
                    devices=devices,
                    clock=clock,
                )
            )

        if settings.passkeys.enabled:  # the passkey pages and ceremonies (docs/passkeys.md)
            routes = build_passkey_routes(
                settings,
                policy=policy,
                tokens=access_tokens,
                client=client,
                sessions=store,
                metrics=metrics,
                auditor=auditor,
                signer=signer,
                links=links,
                clock=clock,
            )
            add_passkey_routes(http_app, routes)
            # Credentials are the one state that cannot be rebuilt from the IdP: say at
            # start whether this Redis persists and never evicts them (refuse: enrolment off).
            await routes.startup()
        idp.on_ready(push_stepup)
        await idp.start()
        runner = web.AppRunner(http_app, access_log=None)
        await runner.setup()
        http_tls = None
        if settings.http.tls is not None:
            http_tls = server_context(settings.http.tls, "http")
        site = web.TCPSite(
            runner,
            settings.http.host,
            settings.http.port,
            reuse_port=True,
            ssl_context=http_tls,
        )
        await site.start()
        http_port = runner.addresses[0][1]
        await grpc_server.start()
        if api_server is not None:
            await api_server.start()
        http_authz = await maybe_start(
            settings.http_authz,
            authorizer,
            HttpResponseBuilder(
                error_status=settings.stepup.error_status,
                redirects=redirects,
                strip_cookies=strip,
            ),
        )
        metrics_runner = await start_metrics_listener(settings.metrics, metrics)
    except BaseException:
        await _close_all(closers)
        raise
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # serve --workers N (authz.ops.workers)
        # /metrics reports every worker's counters and histograms, summed; the per-process
        # registry keeps collecting (its values live in the shared directory).
        from prometheus_client import CollectorRegistry, multiprocess

        metrics.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(metrics.registry)  # type: ignore[no-untyped-call]
    service = Service(
        settings,
        metrics,
        policy,
        authorizer,
        grpc_server,
        stepup,
        health,
        runner,
        http_port,
        http_authz,
        api_server,
        closers,
        metrics_runner=metrics_runner,
    )
    service._tasks.append(asyncio.create_task(service._watch_policy()))
    log.info(
        "stepup-authz serving",
        extra={
            "grpc": f"{settings.grpc.host}:{grpc_server.port}",
            "http": f"{settings.http.host}:{http_port}",
            "metrics": service.metrics_port,
            "policy_version": loaded.version,
        },
    )
    return service


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the policy."""
    service = await start_service(settings)
    # Everything built at start-up (modules, policy, protobuf descriptors: ~100k objects)
    # lives until exit: move it out of the cyclic GC's reach, so that a full collection under
    # load scans only what requests allocate (a full scan took ~25 ms, enough to miss the
    # Redis deadline of the Checks waiting behind it).
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.policy.reload)
    try:
        await stop.wait()
        log.info("shutting down: NOT_SERVING, draining in-flight checks")
    finally:
        await service.stop()
        log.info("stopped")
