"""The gRPC listener's lifecycle: mTLS, graceful shutdown with in-flight checks drained."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz.app import Service, start_service
from authz.audit.testing import dev_mac_settings
from authz.config.settings import Settings
from authz.core.session import UserState
from authz.devidp import DevClient, DevIdpConfig, base_url, bind, running
from tests.builders import async_wait_until, check_request, password_token
from tests.tlsutil import cert as tls_cert
from tests.tlsutil import pem

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = tls_cert("test-ca", ca_key, None, ca_key, ca=True)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = tls_cert("other-ca", other_key, None, other_key, ca=True)
    files: dict[str, Path] = {}
    for name, obj in {"ca.pem": ca, "other-ca.pem": other_ca}.items():
        (d / name).write_bytes(pem(obj))
        files[name] = d / name
    for who, issuer, issuer_key in (
        ("server", ca, ca_key),
        ("client", ca, ca_key),
        ("rogue", other_ca, other_key),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = tls_cert(
            "localhost" if who == "server" else who,
            key,
            issuer,
            issuer_key,
            ca=False,
            sans=[x509.DNSName("localhost")],
        )
        (d / f"{who}.pem").write_bytes(pem(cert))
        (d / f"{who}-key.pem").write_bytes(pem(key))
        files[who] = d / f"{who}.pem"
        files[f"{who}-key"] = d / f"{who}-key.pem"
    yield files


@contextlib.asynccontextmanager
async def _service(redis_url: str, redis_prefix: str, **grpc_extra: Any) -> AsyncIterator[Service]:
    sock = bind()
    idp = base_url(sock)
    cfg = DevIdpConfig(
        issuer=idp,
        clients={"stepup-authz": DevClient("dev-secret", ("http://app.test/_stepup/callback",))},
    )
    async with running(cfg, sock):
        settings = Settings.model_validate(
            {
                "policy_file": str(ROOT / "examples" / "policy.yaml"),
                "grpc": {"port": 0, "shutdown_grace_s": 5, "shutdown_delay_s": 0.3, **grpc_extra},
                "http": {"port": 0},
                "redis": {"url": redis_url, "key_prefix": redis_prefix},
                "oidc": {
                    "issuer": idp,
                    "client_id": "stepup-authz",
                    "client_secret": "dev-secret",
                    "audience": "stepup-demo",
                    "algorithms": ["RS256"],
                },
                "stepup": {"public_url": "http://app.test", "cookie_secure": False},
                "audit": dev_mac_settings(),
            }
        )
        service = await start_service(settings)
        try:
            yield service
        finally:
            await service.stop()


async def test_mtls_listener_requires_a_client_cert_from_the_ca(
    redis_url: str, redis_prefix: str, pki: dict[str, Path]
) -> None:
    tls = {
        "cert_file": str(pki["server"]),
        "key_file": str(pki["server-key"]),
        "client_ca_file": str(pki["ca.pem"]),
    }
    async with _service(redis_url, redis_prefix, tls=tls) as service:
        target = f"localhost:{service.grpc_port}"
        root = pki["ca.pem"].read_bytes()

        async def call(creds: grpc.ChannelCredentials) -> int:
            async with grpc.aio.secure_channel(target, creds) as ch:
                stub = external_auth_pb2_grpc.AuthorizationStub(ch)
                r = await stub.Check(check_request(), timeout=3)
                return int(r.denied_response.status.code or 200)

        good = grpc.ssl_channel_credentials(
            root, pki["client-key"].read_bytes(), pki["client"].read_bytes()
        )
        assert await call(good) == 200  # "/" is public in the demo policy
        for creds in (
            grpc.ssl_channel_credentials(root),  # no client certificate
            grpc.ssl_channel_credentials(
                root, pki["rogue-key"].read_bytes(), pki["rogue"].read_bytes()
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(creds)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # and plaintext is refused
        async with grpc.aio.insecure_channel(target) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request(), timeout=3)


class _HeldStore:
    """Holds the first read (``entered`` set) until ``release`` is set, so a Check is in
    flight for exactly as long as the test needs while the service shuts down."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entered, self.release = asyncio.Event(), asyncio.Event()

    async def read_check(self, **kw: Any) -> UserState:
        if not self.entered.is_set():
            self.entered.set()
            await self.release.wait()
        result: UserState = await self.inner.read_check(**kw)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_graceful_shutdown_goes_not_serving_and_drains(
    redis_url: str, redis_prefix: str
) -> None:
    """NOT_SERVING first, then (after shutdown_delay_s, the listener's own timer: a real
    0.3 s) the listener stops taking new calls while the one in flight is drained."""
    async with _service(redis_url, redis_prefix) as service:
        token = await password_token(service.settings.oidc.issuer)
        store = _HeldStore(service.authorizer.store)
        service.authorizer.store = store
        target = f"127.0.0.1:{service.grpc_port}"
        async with grpc.aio.insecure_channel(target) as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            # elevated: reads the (held) store
            req = check_request("/accounts/1", {"authorization": f"Bearer {token}"})
            in_flight = asyncio.ensure_future(stub.Check(req, timeout=10))
            await asyncio.wait_for(store.entered.wait(), 10)
            stopping = asyncio.ensure_future(service.grpc.stop())

            async def not_serving() -> bool:
                r = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                return bool(r.status == health_pb2.HealthCheckResponse.NOT_SERVING)

            await async_wait_until(not_serving, "health NOT_SERVING")

            async def refusing_new_calls() -> bool:
                try:
                    await stub.Check(check_request(), timeout=1)
                except grpc.aio.AioRpcError:
                    return True
                return False

            await async_wait_until(refusing_new_calls, "the listener to stop taking calls")
            assert not in_flight.done()  # still held: stopping has not cut it off
            store.release.set()
            response = await in_flight  # drained, with a real decision
            assert response.denied_response.status.code == 401
            await stopping
            with pytest.raises(grpc.aio.AioRpcError):  # and then the listener is gone
                await stub.Check(check_request(), timeout=1)
