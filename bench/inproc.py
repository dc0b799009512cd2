"""The service's Check path in process, for bench.micro and bench.growth.

What the service does for one check, minus the socket: the composition root
(``authz.app.start_service``) builds the real objects from a Settings file (the token
verifier and its cache, the RedisSessionStore over FastRedis, the Authorizer, the auditor),
and one check is

* HTTP mode: the request bytes as Envoy sends them -> the listener's connection protocol
  (``http_server._Conn``: framing, ``parse_head``, ``attributes_from_http``, a Task running
  ``Authorizer.check``, ``HttpResponseBuilder``, the write) over an in-memory transport;
* gRPC mode: the CheckRequest bytes -> ``CheckRequest.FromString`` -> the service's
  servicer (``grpc_server.AuthorizationServicer.Check``: ``attributes_from_check``,
  ``Authorizer.check``, ``ResponseBuilder``) -> ``SerializeToString``.

CPU is ``time.process_time`` of this process (every thread) over a closed loop of ``concurrency``
checks in flight; Redis' own CPU is another process's and is read from /proc when its pid
is known.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from authz.app import Service, start_service
from authz.check.response import HttpResponseBuilder, ResponseBuilder
from authz.config.settings import Settings, load_settings
from authz.core.session import Evidence, Grant, session_key, user_key

PATH = "/accounts/1"  # `elevated` in examples/policy.yaml: allowed by a grant
# The request id and forwarded headers Envoy adds to every check (bench/envoy/*.yaml).
REQUEST_ID = "7a1c3a2e-3f4b-4b7e-9d0e-000000000000"
XFF = "192.0.2.2"  # what the bench Envoys (use_remote_address) forwarded from wrk here
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


# -- what Envoy sends ---------------------------------------------------------------------------
def http_check_head(
    token: str, path: str = PATH, *, host: str = "127.0.0.1:8080", prefix: str = "/check"
) -> bytes:
    """A check request head as Envoy 1.40's ``http_service`` sends it for ``GET <path>``
    from wrk (bench/envoy/authz_http.yaml), the headers in Envoy's order: as the HTTP floor
    recorded it (``bench.floors --record``), token and request id aside."""
    lines = [
        f"GET {prefix}{path} HTTP/1.1",
        f"host: {host}",
        "content-length: 0",
        f"x-forwarded-for: {XFF}",
        "x-forwarded-proto: http",
        f"x-request-id: {REQUEST_ID}",
        f"authorization: Bearer {token}",
        "x-stepup-peer-address: 127.0.0.1",
        "x-envoy-internal: true",
        "x-envoy-expected-rq-timeout-ms: 250",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def grpc_check_request(token: str, path: str = PATH, *, host: str = "127.0.0.1:8080") -> bytes:
    """A CheckRequest as Envoy 1.40's gRPC ext_authz sends it for ``GET <path>`` from wrk
    (as the gRPC floor recorded it, token and ids aside)."""
    from envoy.service.auth.v3 import external_auth_pb2

    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address = "127.0.0.1"
    a.source.address.socket_address.port_value = 40000
    a.destination.address.socket_address.address = "127.0.0.1"
    a.destination.address.socket_address.port_value = 8080
    http = a.request.http
    a.request.time.seconds, a.request.time.nanos = int(time.time()), 652158000
    http.id, http.method, http.path, http.host = "17560586389544596320", "GET", path, host
    http.scheme, http.protocol = "http", "HTTP/1.1"
    http.headers.update(
        {
            "x-forwarded-proto": "http",
            ":method": "GET",
            "x-request-id": REQUEST_ID,
            "authorization": f"Bearer {token}",
            "x-forwarded-for": XFF,
            ":authority": host,
            ":path": path,
            "x-envoy-external-address": "127.0.0.1",
            "x-stepup-peer-address": "127.0.0.1",  # the rendered config's header_mutation
            ":scheme": "http",
        }
    )
    return bytes(req.SerializeToString())


# -- one check, the service's way ---------------------------------------------------------------
class _MemTransport:
    """The transport under one listener connection in process: ``write`` hands the answer's
    status to the check waiting for it; nothing reaches a socket (the floor measures that)."""

    def __init__(self, conn: Any, port: int) -> None:
        self.conn = conn
        self.peer = ("127.0.0.1", port)
        self.answer: asyncio.Future[int] | None = None
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(int(data[9:12]))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.conn.connection_lost(None)

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class HttpPath:
    """One HTTP-mode check: the request bytes into the listener's own connection protocol
    (authz/check/http_server.py ``_Conn``, under an ``HttpAuthzServer`` that is not bound to
    a port), which frames, parses, makes the attributes, runs the Check in a Task of its own
    and encodes and writes the answer, exactly as in the service. Each check in flight has a
    keep-alive connection of its own, as Envoy's pool gives it; only the socket is missing."""

    def __init__(self, authorizer: Any, settings: Settings) -> None:
        from authz.check.http_server import HttpAuthzServer, _Conn

        responses = HttpResponseBuilder(
            path_prefix=settings.stepup.path_prefix, error_status=settings.stepup.error_status
        )
        self.server = HttpAuthzServer(authorizer, responses, settings.http_authz)
        self._conn = _Conn
        self._idle: list[_MemTransport] = []
        self._ports = iter(range(40000, 1 << 30))

    def _open(self) -> _MemTransport:
        conn = self._conn(self.server)
        transport = _MemTransport(conn, next(self._ports))
        conn.connection_made(cast(asyncio.BaseTransport, transport))
        if transport.closed:
            raise RuntimeError("the listener refused the in-process connection")
        return transport

    async def once(self, raw: bytes) -> int:
        transport = self._idle.pop() if self._idle else self._open()
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        transport.answer = answer
        transport.conn.data_received(raw)
        status = await answer
        if not transport.closed:
            self._idle.append(transport)
        return status


class GrpcPath:
    """One gRPC-mode check without grpcio: the bytes parsed as grpcio would, then the
    service's own servicer (``AuthorizationServicer.Check``, no call context: no deadline)
    and the answer serialised as grpcio would."""

    def __init__(self, authorizer: Any, settings: Settings) -> None:
        from envoy.service.auth.v3 import external_auth_pb2

        from authz.check.grpc_server import AuthorizationServicer

        self.parse = external_auth_pb2.CheckRequest.FromString
        self.servicer = AuthorizationServicer(
            authorizer,
            ResponseBuilder(error_status=settings.stepup.error_status),
            peer_header=settings.grpc.peer_header,
        )

    async def once(self, raw: bytes) -> int:
        resp = await self.servicer.Check(self.parse(raw), None)
        resp.SerializeToString()
        code: int = resp.status.code
        return 200 if code == 0 else 403


# -- the measurement -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    checks: int
    not_allowed: int
    cpu_s: float
    wall_s: float
    redis_cpu_s: float | None = None

    @property
    def cpu_us_per_check(self) -> float:
        return self.cpu_s / self.checks * 1e6

    @property
    def redis_us_per_check(self) -> float | None:
        return None if self.redis_cpu_s is None else self.redis_cpu_s / self.checks * 1e6

    def as_dict(self) -> dict[str, Any]:
        return {
            "checks": self.checks,
            "not_allowed": self.not_allowed,
            "cpu_us_per_check": self.cpu_us_per_check,
            "wall_us_per_check": self.wall_s / self.checks * 1e6,
            "redis_us_per_check": self.redis_us_per_check,
        }


async def closed_loop(
    one: Callable[[int], Awaitable[int]],
    n: int,
    concurrency: int,
    *,
    drain: Callable[[], Awaitable[None]] | None = None,
    redis_cpu: Callable[[], float] | None = None,
) -> Measured:
    """``n`` checks, ``concurrency`` in flight (each worker starts its next check when its
    last one answered, as wrk's connections do); ``one(i)`` gets the check's index and
    returns its status. ``drain`` (the background writes) is waited for inside the
    measurement: their CPU is the check's."""
    counter = iter(range(n))
    refused = 0

    async def worker() -> None:
        nonlocal refused
        for i in counter:
            if await one(i) != 200:
                refused += 1

    r0 = redis_cpu() if redis_cpu else None
    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    if drain is not None:
        await drain()
    c1, t1 = time.process_time(), time.perf_counter()
    r1 = redis_cpu() if redis_cpu else None
    return Measured(n, refused, c1 - c0, t1 - t0, None if r0 is None or r1 is None else r1 - r0)


# -- settings, service, token, grant -------------------------------------------------------------
def in_process_settings(config: Path, **overrides: Any) -> Settings:
    """The service's settings file, with every listener on port 0 (this process serves
    nothing: a listener on the service's own ports would share them by SO_REUSEPORT) and
    ``overrides`` (section -> field values) applied."""
    s = load_settings(config, env={})
    updates: dict[str, Any] = {
        "grpc": s.grpc.model_copy(update={"port": 0, "shutdown_delay_s": 0}),
        "http": s.http.model_copy(update={"port": 0}),
        "http_authz": s.http_authz.model_copy(update={"enabled": False, "port": 0}),
    }
    for section, values in overrides.items():
        current = updates.get(section, getattr(s, section))
        updates[section] = (
            current.model_copy(update=values) if hasattr(current, "model_copy") else values
        )
    return s.model_copy(update=updates)


async def start(settings: Settings) -> Service:
    """The composition root's service, with the start-up objects frozen out of the GC as
    ``stepup-authz serve`` does (authz.app.serve)."""
    service = await start_service(settings)
    gc.collect()
    gc.freeze()
    return service


def password_token(settings: Settings, *, username: str = "alice") -> str:
    """An ``acr=pwd`` access token from the (dev) IdP the settings name."""
    form = {"grant_type": "password", "username": username, "password": f"{username}-password"}
    basic = base64.b64encode(
        f"{settings.oidc.client_id}:{settings.oidc.secret()}".encode()
    ).decode()
    req = urllib.request.Request(  # noqa: S310 (loopback http only)
        f"{settings.oidc.issuer}/token",
        data=urllib.parse.urlencode(form).encode(),
        headers={"Authorization": f"Basic {basic}"},
    )
    with _opener.open(req, timeout=5) as resp:
        return str(json.loads(resp.read())["access_token"])


def bench_grant(level: str, now: int, ttl_s: int) -> Grant:
    """The grant an mfa step-up just now would record (the harness's scenario grants)."""
    return Grant(
        level=level,
        evidence=Evidence("mfa", ("pwd", "otp"), now),
        expires_at=now + ttl_s,
        issued_at=now,
    )


async def write_grant(
    store: Any, claims: dict[str, Any], level: str, ttl_s: int, now: int | None = None
) -> None:
    """Record a grant for the session of ``claims`` through the store's own API."""
    now = int(time.time()) if now is None else now
    await store.write_grant(
        user_key(claims["iss"], claims["sub"]),
        session_key(claims["iss"], claims["sub"], claims["sid"]),
        bench_grant(level, now, ttl_s),
        now,
    )


# -- a Valkey and an IdP of our own (bench.micro without --config, bench.growth) ----------------
@dataclass
class Local:
    workdir: Path
    redis_url: str
    redis_pid: int | None
    idp_url: str
    provider: Any  # authz.devidp.app.Provider: its key signs the tokens bench.growth mints

    def write_settings(self, policy_file: Path, name: str = "config", **extra: Any) -> Path:
        """A settings file as the bench stack writes it (bench.stackctl.BenchStack: its
        keyring, audit before access from ``high``, log level INFO), for this Valkey and
        IdP; ``extra`` is merged in (e.g. ``oidc={"token_cache_size": N}``)."""
        import yaml

        from authz.demo.stack import deep_merge
        from bench.stackctl import BenchStack

        stack = BenchStack(self.workdir / "stack", policy_file, "INFO")
        key = stack.bench_crypto_key
        key.parent.mkdir(parents=True, exist_ok=True)
        if not key.exists():
            key.write_bytes(os.urandom(32))
        doc = deep_merge(
            stack.settings(), {"redis": {"url": self.redis_url}, "oidc": {"issuer": self.idp_url}}
        )
        doc = deep_merge(doc, extra)
        # The key files the settings name and the stack writes when it starts (the audit
        # records' MAC keys): the service refuses to audit without them.
        for key_file in ((doc.get("audit") or {}).get("mac_keys") or {}).values():
            if not Path(key_file).exists():
                from authz.audit.testing import write_mac_key

                write_mac_key(Path(key_file))
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path


@contextlib.asynccontextmanager
async def local_environment(workdir: Path, *, redis_url: str | None = None) -> AsyncIterator[Local]:
    """An embedded Valkey (unless ``redis_url``) and the dev IdP served from this process
    (idle while checks are measured: the verifier fetches its JWKS once)."""
    from authz.demo.stack import AUDIENCE, CLIENT_ID, CLIENT_SECRET
    from authz.devidp import DevClient, DevIdpConfig, base_url, bind, running
    from authz.devidp.app import PROVIDER_KEY
    from authz.store.connections import EmbeddedValkey
    from bench.stackctl import find_pid

    embedded: EmbeddedValkey | None = None
    pid: int | None = None
    if redis_url is None:
        embedded = EmbeddedValkey()
        redis_url = await asyncio.to_thread(embedded.start)
        pid = find_pid("valkey-server", f"127.0.0.1:{embedded.port}") or find_pid(
            "valkey-server", "--port", str(embedded.port)
        )
    try:
        sock = bind()
        idp = base_url(sock)
        cfg = DevIdpConfig(
            issuer=idp,
            clients={CLIENT_ID: DevClient(CLIENT_SECRET, ("http://127.0.0.1/_stepup/callback",))},
            access_token_audience=AUDIENCE,
        )
        async with running(cfg, sock) as runner:
            yield Local(workdir, redis_url, pid, idp, runner.app[PROVIDER_KEY])
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
