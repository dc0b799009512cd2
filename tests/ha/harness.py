"""The service in-process for the HA and fault tests: real gRPC on port 0, the dev IdP behind a
fault-injecting HTTP proxy (the issuer is the proxy's URL, so discovery, JWKS and the token
endpoint all pass through it), and whatever Redis topology the test configures.

Nothing here is a fake: the proxy forwards to the real dev IdP unless told to fail a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.app import Service, start_service
from authz.audit.testing import dev_mac_settings
from authz.config.settings import Settings
from authz.core.session import Evidence, Grant, session_key, user_key
from authz.demo.stack import deep_merge
from authz.devidp import DevClient, DevIdpConfig, base_url, bind, running
from authz.store.connections import make_redis
from authz.store.sessions import RedisSessionStore
from tests.builders import async_wait_until, check_request, password_token, response_header

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = "http://app.test"
CLIENT_SECRET = "dev-secret"

# The demo policy, with checks at "elevated" and above counted for velocity: the read
# script then also writes (INCR), so a read-only replica cannot answer it.
POLICY = (ROOT / "examples" / "policy.yaml").read_text() + "signals: {sensitive_level: elevated}\n"
SENSITIVE = "/accounts/1"  # elevated (GET)
STANDARD = "/news"
PUBLIC_PATH = "/public/info"


@dataclass
class FaultProxy:
    """Forwards to ``upstream``; ``modes[path]`` makes one path fail:
    ``"error"`` (HTTP 500 with an OAuth error body), ``"down"`` (HTTP 503, as a dead
    backend behind a load balancer), ``"close"`` (drop the connection), ``"hold"`` (wait
    until ``release`` is set, then forward). ``hits`` counts requests as they arrive,
    ``done`` as the proxy finishes them."""

    upstream: str
    modes: dict[str, str] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    done: Counter[str] = field(default_factory=Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        try:
            return await self._handle(request)
        finally:
            self.done[request.path] += 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        mode = self.modes.get(request.path, "pass")
        if mode == "error":
            return web.json_response({"error": "server_error"}, status=500)
        if mode == "down":
            return web.Response(status=503, text="upstream down")
        if mode == "close":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never reaches the client
        if mode == "hold":
            await self.release.wait()
        body = await request.read()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("host", "content-length", "transfer-encoding")
        }
        async with (
            aiohttp.ClientSession() as s,
            s.request(
                request.method,
                self.upstream + request.path_qs,
                data=body,
                headers=headers,
                allow_redirects=False,
            ) as up,
        ):
            data = await up.read()
            out = web.Response(status=up.status, body=data)
            for name in ("Content-Type", "Location", "Cache-Control"):
                if name in up.headers:
                    out.headers[name] = up.headers[name]
            for value in up.headers.getall("Set-Cookie", []):
                out.headers.add("Set-Cookie", value)
            return out


@dataclass
class Result:
    allowed: bool
    status: int  # the HTTP status Envoy would send (200 when allowed)
    reason: str | None


@dataclass
class Env:
    service: Service
    idp: str  # the issuer: the proxy's URL
    proxy: FaultProxy
    stub: external_auth_pb2_grpc.AuthorizationStub
    channel: grpc.aio.Channel
    clock: Callable[[], float] = time.time  # the service's

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.service.http_port}"

    async def check(
        self,
        path: str,
        token: str | None = None,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 - the gRPC deadline
    ) -> Result:
        h = dict(headers or {})
        if token is not None:
            h["authorization"] = f"Bearer {token}"
        r = await self.stub.Check(check_request(path, h, method=method), timeout=timeout)
        if r.HasField("ok_response"):
            return Result(r.status.code == 0, 200, None)
        return Result(False, r.denied_response.status.code, response_header(r, "x-stepup-reason"))

    async def token(self, user: str = "alice", *, otp: bool = False) -> str:
        return await password_token(self.idp, user, otp=otp, client_secret=CLIENT_SECRET)

    async def keys(self, token: str) -> tuple[str, str]:
        """(user key, session key) of the token's session, as the Check computes them."""
        ident = await self.service.authorizer.tokens.verify_access_token(token, int(self.clock()))
        return (
            user_key(ident.issuer, ident.subject),
            session_key(ident.issuer, ident.subject, ident.session_id),
        )

    async def grant(self, token: str, level: str = "elevated", ttl: int = 600) -> None:
        """Record a step-up grant for the token's session, as the callback does."""
        uk, sk = await self.keys(token)
        now = int(self.clock())
        grant = Grant(
            level=level,
            evidence=Evidence("mfa", ("pwd", "otp"), now - 1),
            expires_at=now + ttl,
            issued_at=now,
        )
        # A setup write, not a Check: its own store, with no latency budget.
        r = self.service.settings.redis
        # Same cipher as the service's store (values are encrypted at rest), when it has one.
        cipher = getattr(self.service.authorizer.store, "cipher", None)
        kwargs: dict[str, Any] = {} if cipher is None else {"cipher": cipher}
        store = RedisSessionStore(make_redis(r), prefix=r.key_prefix, deadline_ms=5000, **kwargs)
        try:
            await store.write_grant(uk, sk, grant, now)
        finally:
            await store.aclose()

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.service.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def idp_behind_proxy() -> AsyncIterator[tuple[str, FaultProxy]]:
    """The dev IdP on one port, the fault proxy on another; the issuer is the proxy."""
    idp_sock, proxy_sock = bind(), bind()
    issuer = base_url(proxy_sock)
    cfg = DevIdpConfig(
        issuer=issuer,
        clients={"stepup-authz": DevClient(CLIENT_SECRET, (f"{PUBLIC}/_stepup/callback",))},
    )
    proxy = FaultProxy(base_url(idp_sock))
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, proxy_sock).start()
        async with running(cfg, idp_sock):
            yield issuer, proxy
    finally:
        proxy.release.set()  # held requests go on, so the runner can close
        await runner.cleanup()
        for sock in (idp_sock, proxy_sock):
            with contextlib.suppress(OSError):
                sock.close()


def settings_for(
    issuer: str, policy_file: Path, redis: dict[str, Any], extra: dict[str, Any] | None = None
) -> Settings:
    base: dict[str, Any] = {
        "policy_file": str(policy_file),
        "grpc": {"port": 0, "shutdown_delay_s": 0},
        "http": {"port": 0},
        "redis": redis,
        "oidc": {
            "issuer": issuer,
            "client_id": "stepup-authz",
            "client_secret": CLIENT_SECRET,
            "audience": "stepup-demo",
            "algorithms": ["RS256"],
            "token_typ": "at+jwt",
        },
        "stepup": {"public_url": PUBLIC, "cookie_secure": False},
        "audit": dev_mac_settings(),  # the service refuses to audit without a MAC key
    }
    return Settings.model_validate(deep_merge(base, extra or {}))


@contextlib.asynccontextmanager
async def service_env(
    tmp_path: Path,
    redis: dict[str, Any],
    extra: dict[str, Any] | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Env]:
    """The service with ``redis`` settings (url | sentinel | cluster, key_prefix ...),
    deciding on ``clock``."""
    policy = tmp_path / "policy.yaml"
    await asyncio.to_thread(_write, policy, POLICY)
    async with idp_behind_proxy() as (issuer, proxy):
        service = await start_service(settings_for(issuer, policy, redis, extra), clock=clock)
        # Warm up as a readiness probe would: the first command must discover the topology
        # (sentinel lookup, cluster slot map) and connect, all under the 50 ms deadline,
        # which a busy 2-core machine can miss (that Check would fail closed).
        store: Any = service.authorizer.store
        await async_wait_until(store.ping, "the store to answer PING")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        try:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            yield Env(service, issuer, proxy, stub, channel, clock)
        finally:
            await channel.close()
            await service.stop()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
