"""Device identity (certificate, assertion, cookie) and GeoIP lookups against a small
MaxMind DB the test writes itself."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from types import MappingProxyType
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from authz.check.devices import (
    CertificateTrust,
    DeviceCookies,
    DeviceResolver,
    cookie_device_id,
    xfcc_certificate,
)
from authz.check.geoip import GeoIP
from authz.check.tokens import StaticKeySource, TokenVerifier
from authz.config.settings import OidcSettings
from authz.core.attributes import RequestAttributes
from tests.builders import ec_key, jwks, sign

NOW = 1_800_000_000
WHEN = dt.datetime.fromtimestamp(NOW, dt.UTC)
CA_KEY = ec.generate_private_key(ec.SECP256R1())
CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-ca")])
CA = (
    x509.CertificateBuilder()
    .subject_name(CA_NAME)
    .issuer_name(CA_NAME)
    .public_key(CA_KEY.public_key())
    .serial_number(1)
    .not_valid_before(WHEN - dt.timedelta(days=1))
    .not_valid_after(WHEN + dt.timedelta(days=30))
    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    .add_extension(
        x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
    )
    .add_extension(x509.SubjectKeyIdentifier.from_public_key(CA_KEY.public_key()), critical=False)
    .sign(CA_KEY, hashes.SHA256())
)


def cert_pem(
    uri: str | None = "spiffe://corp.example/device/42",
    *,
    signer: ec.EllipticCurvePrivateKey | None = None,
    days: tuple[int, int] = (-1, 1),
) -> str:
    """A device certificate signed by the device CA (or ``signer``), URL-encoded as Envoy
    forwards it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "laptop")])
    sans: list[x509.GeneralName] = [x509.DNSName("laptop.corp.example")]
    if uri:
        sans.append(x509.UniformResourceIdentifier(uri))
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(CA_NAME)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(WHEN + dt.timedelta(days=days[0]))
        .not_valid_after(WHEN + dt.timedelta(days=days[1]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(CA_KEY.public_key()),
            critical=False,
        )
    )
    cert = b.sign(signer or CA_KEY, hashes.SHA256())
    return quote(cert.public_bytes(serialization.Encoding.PEM).decode())


@pytest.fixture
def trust(tmp_path: Path) -> CertificateTrust:
    ca = tmp_path / "device-ca.pem"
    ca.write_bytes(CA.public_bytes(serialization.Encoding.PEM))
    return CertificateTrust(ca)


COOKIES = DeviceCookies(b"k" * 32, "__Host-stepup-device")


def attrs(headers: dict[str, str] | None = None, cert: str = "") -> RequestAttributes:
    return RequestAttributes(
        "GET",
        "https",
        "app.test",
        "/",
        "",
        MappingProxyType(headers or {}),
        ipaddress.ip_address("10.0.0.1"),
        peer_certificate=cert,
    )


async def test_a_certificate_from_the_device_ca_names_its_device(trust: CertificateTrust) -> None:
    r = DeviceResolver(certificates=trust)
    spiffe = await r.resolve(attrs(cert=cert_pem()), NOW)
    assert spiffe is not None and (spiffe.id, spiffe.source) == (
        "spiffe://corp.example/device/42",
        "mtls",
    )
    plain = await r.resolve(attrs(cert=cert_pem(None)), NOW)
    assert plain is not None and plain.id.startswith("sha256:") and len(plain.id) == 71


@pytest.mark.parametrize(
    "cert",
    [
        pytest.param(
            lambda: cert_pem(signer=ec.generate_private_key(ec.SECP256R1())), id="other-ca"
        ),
        pytest.param(lambda: cert_pem(days=(-10, -1)), id="expired"),
        pytest.param(lambda: cert_pem(days=(1, 10)), id="not-yet-valid"),
        pytest.param(lambda: "not%20a%20cert", id="garbage"),
    ],
)
async def test_a_certificate_that_does_not_verify_is_no_device(
    trust: CertificateTrust, cert: object
) -> None:
    r = DeviceResolver(certificates=trust)
    assert await r.resolve(attrs(cert=cert()), NOW) is None  # type: ignore[operator]


async def test_without_a_device_ca_certificates_are_not_device_ids() -> None:
    assert await DeviceResolver().resolve(attrs(cert=cert_pem()), NOW) is None


def test_the_device_cookie_is_ours_or_nothing() -> None:
    value, device = COOKIES.issue()
    assert COOKIES.device_id(value) == device == cookie_device_id(value)
    assert value not in device  # the id is a hash: the trail never holds the cookie
    nonce = value.split(".")[1]
    for forged in ("A" * 32, f"d1.{nonce}.AAAAAAAAAAAAAAAAAAAAAAAA", f"d2.{nonce}.x", "", "d1..x"):
        assert COOKIES.device_id(forged) is None
    other = DeviceCookies(b"z" * 32)
    assert other.device_id(value) is None  # another key (another deployment)


MDM_KEY = ec_key("mdm-1")


def assertion(**claims: object) -> str:
    body = {
        "iss": "https://mdm.example",
        "aud": "stepup-authz",
        "sub": "dev-7",
        "iat": NOW - 10,
        "exp": NOW + 200,
        "jti": "a-1",
        "managed": True,
        "compliant": True,
        "platform": "macOS",
        **claims,
    }
    return sign(MDM_KEY, body)


@pytest.fixture
def resolver(trust: CertificateTrust) -> DeviceResolver:
    settings = OidcSettings(
        issuer="https://mdm.example",
        client_id="stepup-authz",
        audience="stepup-authz",
        algorithms=("ES256",),
        token_cache_size=0,
    )
    verifier = TokenVerifier(settings, StaticKeySource(jwks(MDM_KEY)))
    return DeviceResolver(
        cookies=COOKIES,
        certificates=trust,
        assertion_header="X-Device-Assertion",
        assertions=verifier,
        assertion_audience="stepup-authz",
    )


async def test_sources_in_order_of_strength(resolver: DeviceResolver) -> None:
    value, cookie_id = COOKIES.issue()
    cookie = {"cookie": f"__Host-stepup-device={value}"}
    signed = {"x-device-assertion": assertion(), **cookie}
    d = await resolver.resolve(attrs(signed, cert_pem()), NOW)
    assert d is not None and (d.id, d.source) == ("spiffe://corp.example/device/42", "mtls")
    d = await resolver.resolve(attrs(signed), NOW)
    assert d is not None and (d.id, d.source) == ("mdm:dev-7", "assertion")
    assert (d.managed, d.compliant, d.platform) == (True, True, "macOS")
    d = await resolver.resolve(attrs(cookie), NOW)
    assert d is not None and (d.id, d.source) == (cookie_id, "cookie")
    assert (d.managed, d.compliant) == (None, None)  # a cookie attests no posture
    assert await resolver.resolve(attrs({}), NOW) is None


async def test_a_bad_assertion_attests_nothing_and_falls_back_to_no_posture(
    resolver: DeviceResolver,
) -> None:
    other = ec_key("mdm-1")  # another key under the MDM's kid
    forged = sign(
        other,
        {
            "sub": "dev-7",
            "aud": "stepup-authz",
            "iss": "https://mdm.example",
            "iat": NOW,
            "exp": NOW + 60,
            "jti": "f",
        },
    )
    value, cookie_id = COOKIES.issue()
    for token in (
        forged,
        assertion(exp=NOW - 100),
        assertion(aud="someone-else"),
        assertion(jti=None),  # no jti
        assertion(exp=NOW + 3600, jti="long"),  # lives longer than max_lifetime_s
        "junk",
    ):
        headers = {"x-device-assertion": token, "cookie": f"__Host-stepup-device={value}"}
        d = await resolver.resolve(attrs(headers), NOW)
        # the cookie still names the device; the posture is unattested, never "fine"
        assert d is not None and (d.id, d.compliant, d.managed) == (cookie_id, None, None)
        assert await resolver.resolve(attrs({"x-device-assertion": token}), NOW) is None


async def test_an_assertion_replayed_from_another_address_attests_nothing(
    resolver: DeviceResolver,
) -> None:
    token = assertion(jti="once-per-source")
    first = await resolver.resolve_headers({"x-device-assertion": token}, NOW, client="10.0.0.1")
    assert first is not None and first.compliant is True
    again = await resolver.resolve_headers({"x-device-assertion": token}, NOW, client="10.0.0.1")
    assert again is not None  # the same device sending it again
    stolen = await resolver.resolve_headers({"x-device-assertion": token}, NOW, client="10.9.9.9")
    assert stolen is None


async def test_noncompliant_flags_come_through(resolver: DeviceResolver) -> None:
    d = await resolver.resolve(
        attrs({"x-device-assertion": assertion(compliant=False, managed=False, jti="nc")}), NOW
    )
    assert d is not None and d.compliant is False and d.managed is False


async def test_two_device_cookies_are_ambiguous() -> None:
    a, _ = COOKIES.issue()
    b, _ = COOKIES.issue()
    header = f"__Host-stepup-device={a}; __Host-stepup-device={b}"
    assert await DeviceResolver(cookies=COOKIES).resolve(attrs({"cookie": header}), NOW) is None


def test_xfcc_carries_the_certificate_envoy_set() -> None:
    cert = cert_pem()
    header = f'By=spiffe://edge;Hash=abc;Cert="{cert}";Subject="CN=laptop",By=x;Cert=other'
    assert xfcc_certificate(header) == cert
    assert xfcc_certificate("") == ""


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
