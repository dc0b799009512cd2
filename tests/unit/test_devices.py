"""Device identity (certificate, assertion, cookie) and GeoIP lookups against a small
MaxMind DB the test writes itself."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from pathlib import Path
from types import MappingProxyType
from urllib.parse import quote

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from authz.check.devices import DeviceResolver, cookie_device_id, device_from_certificate
from authz.check.geoip import GeoIP
from authz.check.tokens import StaticKeySource, TokenVerifier
from authz.config.settings import OidcSettings
from authz.core.attributes import RequestAttributes

NOW = 1_800_000_000


def cert_pem(uri: str | None = None) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "laptop")])
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if uri:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    cert = b.sign(key, hashes.SHA256())
    # Envoy forwards the URL-encoded PEM
    return quote(cert.public_bytes(serialization.Encoding.PEM).decode())


def attrs(headers: dict[str, str] | None = None, cert: str = "") -> RequestAttributes:
    return RequestAttributes(
        "GET",
        "https",
        "app.test",
        "/",
        "",
        MappingProxyType(headers or {}),
        None,
        peer_certificate=cert,
    )


def test_certificate_spiffe_id_and_fingerprint() -> None:
    spiffe = device_from_certificate(cert_pem("spiffe://corp.example/device/42"))
    assert spiffe is not None and spiffe.id == "spiffe://corp.example/device/42"
    plain = device_from_certificate(cert_pem())
    assert plain is not None and plain.id.startswith("sha256:") and len(plain.id) == 71
    assert device_from_certificate("not%20a%20cert") is None
    assert device_from_certificate("") is None


MDM_KEY = ec.generate_private_key(ec.SECP256R1())
MDM_JWK = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(MDM_KEY.public_key()))
MDM_JWK.update(kid="mdm-1", alg="ES256", use="sig")


def assertion(**claims: object) -> str:
    body = {
        "iss": "https://mdm.example",
        "aud": "stepup-authz",
        "sub": "dev-7",
        "iat": NOW - 10,
        "exp": NOW + 300,
        "managed": True,
        "compliant": True,
        "platform": "macOS",
        **claims,
    }
    return jwt.encode(body, MDM_KEY, algorithm="ES256", headers={"kid": "mdm-1"})


@pytest.fixture
def resolver() -> DeviceResolver:
    settings = OidcSettings(
        issuer="https://mdm.example",
        client_id="stepup-authz",
        audience="stepup-authz",
        algorithms=("ES256",),
    )
    verifier = TokenVerifier(settings, StaticKeySource({"keys": [MDM_JWK]}))
    return DeviceResolver(
        assertion_header="X-Device-Assertion",
        assertions=verifier,
        assertion_audience="stepup-authz",
    )


async def test_sources_in_order_of_strength(resolver: DeviceResolver) -> None:
    cookie = {"cookie": "stepup_device=" + "c" * 32}
    signed = {"x-device-assertion": assertion(), **cookie}
    cert = cert_pem("spiffe://corp.example/device/42")
    d = await resolver.resolve(attrs(signed, cert), NOW)
    assert d is not None and (d.id, d.source) == ("spiffe://corp.example/device/42", "mtls")
    d = await resolver.resolve(attrs(signed), NOW)
    assert d is not None and (d.id, d.source) == ("mdm:dev-7", "assertion")
    assert (d.managed, d.compliant, d.platform) == (True, True, "macOS")
    d = await resolver.resolve(attrs(cookie), NOW)
    assert d is not None and (d.id, d.source) == (cookie_device_id("c" * 32), "cookie")
    assert "c" * 16 not in d.id  # the cookie names the device; its value is not the id
    assert await resolver.resolve(attrs({}), NOW) is None


async def test_a_bad_assertion_is_not_an_identity(resolver: DeviceResolver) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(
        {
            "sub": "dev-7",
            "aud": "stepup-authz",
            "iss": "https://mdm.example",
            "iat": NOW,
            "exp": NOW + 60,
        },
        other,
        algorithm="ES256",
        headers={"kid": "mdm-1"},
    )
    for token in (forged, assertion(exp=NOW - 100), assertion(aud="someone-else"), "junk"):
        assert await resolver.resolve(attrs({"x-device-assertion": token}), NOW) is None


async def test_noncompliant_flags_come_through(resolver: DeviceResolver) -> None:
    d = await resolver.resolve(
        attrs({"x-device-assertion": assertion(compliant=False, managed=False)}), NOW
    )
    assert d is not None and d.compliant is False and d.managed is False


@pytest.mark.parametrize("value", ["short", "x" * 65, "caf\u00e9" * 5])
async def test_odd_cookies_are_ignored(resolver: DeviceResolver, value: str) -> None:
    assert await resolver.resolve(attrs({"cookie": f"stepup_device={value}"}), NOW) is None


async def test_two_device_cookies_are_ambiguous() -> None:
    header = "stepup_device=" + "a" * 32 + "; stepup_device=" + "b" * 32
    assert await DeviceResolver().resolve(attrs({"cookie": header}), NOW) is None


def write_mmdb(path: Path) -> None:
    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-City")
    w.insert_network(
        IPSet(["198.51.100.0/24"]),
        {"country": {"iso_code": "US"}, "location": {"latitude": 40.71, "longitude": -74.01}},
    )
    w.insert_network(
        IPSet(["203.0.113.0/24"]),
        {"country": {"iso_code": "GB"}, "location": {"latitude": 51.51, "longitude": -0.13}},
    )
    w.insert_network(IPSet(["2001:db8::/32"]), {"country": {"iso_code": "FR"}})
    w.to_db_file(str(path))


def test_geoip_lookups(tmp_path: Path) -> None:
    db = tmp_path / "test.mmdb"
    write_mmdb(db)
    geo = GeoIP(db)
    try:
        us = geo.lookup(ipaddress.ip_address("198.51.100.7"))
        assert (us.country, us.lat, us.lon) == ("US", 40.71, -74.01)
        assert geo.lookup(ipaddress.ip_address("203.0.113.9")).country == "GB"
        assert geo.lookup(ipaddress.ip_address("2001:db8::1")).country == "FR"
        assert geo.lookup(ipaddress.ip_address("192.0.2.1")).country is None
        assert geo.lookup(None).country is None
        assert geo.lookup(ipaddress.ip_address("198.51.100.7")) is us  # cached
    finally:
        geo.close()
