"""mTLS between Envoy and the service: the ext_authz cluster presents a client certificate
from the CA the gRPC listener requires, and verifies the service's certificate; a client
without a certificate from that CA (plaintext, or a foreign CA) cannot reach Check."""

from __future__ import annotations

import datetime as dt
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.demo.stack import Stack
from authz.render import ServiceTls
from tests.builders import check_request

from .conftest import make_stack

pytestmark = pytest.mark.e2e


def _issue(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate | None,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    is_ca: bool,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject if ca else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def _write(d: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / f"{name}-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("mesh CA", ca_key, None, ca_key, is_ca=True)
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, file in (("stepup-authz.internal", "service"), ("envoy.internal", "envoy")):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(d, file, _issue(name, key, ca, ca_key, is_ca=False), key)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _issue("rogue CA", rogue_key, None, rogue_key, is_ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    _write(d, "rogue", _issue("envoy.internal", key, rogue_ca, rogue_key, is_ca=False), key)
    return d


@pytest.fixture(scope="module")
def mtls_stack(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[Stack]:
    # Envoy's side is `render envoy --service-tls-*`: the check cluster verifies the
    # service's certificate (CA + name) and presents Envoy's own.
    service_tls = ServiceTls(
        ca_file=str(pki / "ca.pem"),
        sni="stepup-authz.internal",
        cert_file=str(pki / "envoy.pem"),
        key_file=str(pki / "envoy-key.pem"),
        stepup=False,  # this stack's HTTP port is plaintext (TLS there: test_listener_tls)
    )
    tls = {
        "cert_file": str(pki / "service.pem"),
        "key_file": str(pki / "service-key.pem"),
        "client_ca_file": str(pki / "ca.pem"),
    }
    with make_stack(
        tmp_path_factory, service_tls=service_tls, extra_settings={"grpc": {"tls": tls}}
    ) as s:
        yield s


def _get(stack: Stack, path: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(stack.envoy_url + path, timeout=10) as r:  # noqa: S310
            return int(r.status), dict(r.headers)
    except HTTPError as e:
        return int(e.code), dict(e.headers)


def test_envoy_reaches_the_service_over_mtls(mtls_stack: Stack) -> None:
    status, headers = _get(mtls_stack, "/accounts/1")
    # the service answered (its reason header), not Envoy's fail-closed 403
    assert (status, headers.get("x-stepup-reason")) == (401, "no-credentials")
    status, _ = _get(mtls_stack, "/")
    assert status == 200  # public: allowed by the service over the TLS channel
    body = json.loads(
        urllib.request.urlopen(  # noqa: S310 - a fixed http:// loopback URL
            mtls_stack.envoy_url + "/",
            timeout=10,
        ).read()
    )
    assert body["headers"]["x-stepup-level"] == "public"


@pytest.mark.parametrize("client", ["plaintext", "no-certificate", "rogue-ca"])
def test_other_clients_cannot_call_check(mtls_stack: Stack, pki: Path, client: str) -> None:
    target = mtls_stack.grpc_target
    root = (pki / "ca.pem").read_bytes()
    options = [("grpc.ssl_target_name_override", "stepup-authz.internal")]
    if client == "plaintext":
        channel = grpc.insecure_channel(target)
    elif client == "no-certificate":
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root), options)
    else:
        creds = grpc.ssl_channel_credentials(
            root, (pki / "rogue-key.pem").read_bytes(), (pki / "rogue.pem").read_bytes()
        )
        channel = grpc.secure_channel(target, creds, options)
    with channel, pytest.raises(grpc.RpcError) as info:
        external_auth_pb2_grpc.AuthorizationStub(channel).Check(check_request(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
