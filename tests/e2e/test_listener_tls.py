"""TLS on the HTTP listeners, through the real Envoy: ``render envoy --mode http
--service-tls-*`` makes Envoy's check cluster and its ``/_stepup`` cluster speak mTLS to
the service's HTTP ext_authz port and its HTTP port (``http_authz.tls``, ``http.tls``), on
a throwaway CA made here; a client without a certificate from that CA reaches neither."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from authz.demo.stack import REPO_ROOT, Stack
from authz.render import ServiceTls
from tests.tlsutil import cert, pem

pytestmark = pytest.mark.e2e

NAME = "stepup-authz.internal"
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    ca = cert("listeners CA", ca_key, None, ca_key, ca=True)
    rogue = cert("rogue CA", rogue_key, None, rogue_key, ca=True)
    (d / "ca.pem").write_bytes(pem(ca))
    leaves = {
        "service": (NAME, ca, ca_key),
        "envoy": ("envoy.internal", ca, ca_key),
        "rogue": ("envoy.internal", rogue, rogue_key),
    }
    for file, (name, issuer, issuer_key) in leaves.items():
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        (d / f"{file}.pem").write_bytes(
            pem(cert(name, key, issuer, issuer_key, ca=False, sans=sans))
        )
        (d / f"{file}-key.pem").write_bytes(pem(key))
    return d


def client_context(pki: Path, who: str | None) -> ssl.SSLContext:
    """A client trusting the CA, presenting ``who``'s certificate (None: none)."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if who is not None:
        ctx.load_cert_chain(str(pki / f"{who}.pem"), str(pki / f"{who}-key.pem"))
    return ctx


class TlsStack(Stack):
    """The demo stack in HTTP mode with TLS (mTLS) on both of the service's HTTP ports."""

    def __init__(self, workdir: Path, pki: Path) -> None:
        self.pki = pki
        tls = {
            "cert_file": str(pki / "service.pem"),
            "key_file": str(pki / "service-key.pem"),
            "client_ca_file": str(pki / "ca.pem"),
        }
        super().__init__(
            workdir,
            policy_file=REPO_ROOT / "examples" / "policy.yaml",
            mode="http",
            service_tls=ServiceTls(
                ca_file=str(pki / "ca.pem"),
                sni=NAME,
                cert_file=str(pki / "envoy.pem"),
                key_file=str(pki / "envoy-key.pem"),
            ),
            extra_settings={"http": {"tls": tls}, "http_authz": {"tls": tls}},
            with_audit_exporter=False,
        )

    @property
    def service_http_url(self) -> str:
        return f"https://127.0.0.1:{self.http_port}"

    def service_ready(self) -> bool:
        https = urllib.request.HTTPSHandler(context=client_context(self.pki, "envoy"))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), https)
        try:
            with opener.open(f"{self.service_http_url}/readyz", timeout=1) as r:
                return int(r.status) == 200
        except OSError:
            return False


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[TlsStack]:
    s = TlsStack(tmp_path_factory.mktemp("listener-tls"), pki)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _get(stack: Stack, path: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with _opener.open(stack.envoy_url + path, timeout=10) as r:
            return int(r.status), dict(r.headers), r.read()
    except HTTPError as e:
        return int(e.code), dict(e.headers), e.read()


def test_envoy_checks_over_mtls(tls_stack: TlsStack) -> None:
    status, headers, _ = _get(tls_stack, "/accounts/1")
    # the service's own answer (its reason header), not Envoy's fail-closed 403
    assert (status, headers.get("x-stepup-reason")) == (401, "no-credentials")
    status, headers, _ = _get(tls_stack, "/")
    assert status == 200  # public: allowed by the service over the TLS channel


def test_envoy_reaches_the_stepup_port_over_mtls(tls_stack: TlsStack) -> None:
    status, headers, body = _get(tls_stack, "/_stepup/start?level=elevated&rd=/accounts/1")
    assert status != 503 and b"upstream connect error" not in body, (status, body[:200])
    # the service's own page (its headers), not Envoy's 503 for a cluster it cannot reach
    assert status == 200 and "frame-ancestors 'none'" in headers["Content-Security-Policy"]


async def _exchange(port: int, ctx: ssl.SSLContext | None, request: bytes) -> bytes:
    """What the port answers ``request`` with (b"" when it refuses the client)."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=NAME if ctx else None
        )
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 10)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()


def _check(path: str = "/") -> bytes:
    return (
        f"GET /check{path} HTTP/1.1\r\nhost: localhost\r\nx-stepup-peer-address: 10.0.0.1\r\n"
        "connection: close\r\n\r\n"
    ).encode()


READYZ = b"GET /readyz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"


@pytest.mark.parametrize("client", ["plaintext", "no-certificate", "rogue-ca"])
async def test_other_clients_reach_neither_port(
    tls_stack: TlsStack, pki: Path, client: str
) -> None:
    ctx: dict[str, Any] = {
        "plaintext": None,
        "no-certificate": client_context(pki, None),
        "rogue-ca": client_context(pki, "rogue"),
    }
    for port, request in ((tls_stack.check_port, _check()), (tls_stack.http_port, READYZ)):
        answer = await _exchange(port, ctx[client], request)
        assert not answer.startswith(b"HTTP/1.1 200"), (port, answer[:100])
        assert b"HTTP/1.1" not in answer, (port, answer[:100])  # no HTTP answer at all
    # ...while a client with the CA's certificate gets its answers on both ports.
    good = client_context(pki, "envoy")
    assert (await _exchange(tls_stack.check_port, good, _check())).startswith(b"HTTP/1.1 200")
    assert (await _exchange(tls_stack.http_port, good, READYZ)).startswith(b"HTTP/1.1 200")
