"""Test PKI and a TLS-only redis-server, shared by the tests that need real certificates.

``cert`` makes CA and leaf certificates with the extensions strict verifiers expect (key
usage and subject key id on a CA, authority key id on a leaf); ``tls_redis_server`` starts
Debian's redis-server (built with TLS) on a loopback TLS port only, its certificate naming
``redis.test`` and 127.0.0.1, signed by a CA of its own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    """A certificate for ``key``, signed by ``issuer_key`` (self-signed without ``issuer``),
    valid from five minutes ago for an hour."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        b = b.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    else:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    """PEM of a certificate, or of a private key (PKCS#8, unencrypted)."""
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class TlsRedis:
    port: int
    ca: Path  # the CA that signed the server's certificate
    other_ca: Path  # a CA that did not


@contextlib.contextmanager
def tls_redis_server(directory: Path, *, password: str | None = None) -> Iterator[TlsRedis]:
    """A TLS-only redis-server child on loopback (``--requirepass`` when ``password``)."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server (built with TLS) is required: make system-deps"
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, other_key, srv_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = cert("test CA", ca_key, None, ca_key, ca=True)
    other = cert("someone else's CA", other_key, None, other_key, ca=True)
    srv = cert(
        "redis.test",
        srv_key,
        ca,
        ca_key,
        ca=False,
        sans=[x509.DNSName("redis.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    files = {
        "srv.pem": pem(srv),
        "srv.key": pem(srv_key),
        "ca.pem": pem(ca),
        "other.pem": pem(other),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    port = free_port()
    argv = [
        binary,
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--tls-cert-file",
        str(directory / "srv.pem"),
        "--tls-key-file",
        str(directory / "srv.key"),
        "--tls-ca-cert-file",
        str(directory / "ca.pem"),
        "--tls-auth-clients",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
    ]
    if password is not None:
        argv += ["--requirepass", password]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("redis-server with TLS did not start")
                time.sleep(0.05)
        yield TlsRedis(port, directory / "ca.pem", directory / "other.pem")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
