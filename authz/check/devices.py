"""Device identity at the edge, strongest source first:

1. the mTLS client certificate Envoy forwards (``include_peer_certificate``; at the
   step-up endpoints, Envoy's sanitised ``x-forwarded-client-cert``), accepted only when it
   chains to ``devices.certificate_ca_file`` and is within its validity: its SPIFFE URI
   SAN, else ``sha256:<fingerprint>`` of the certificate;
2. a signed device assertion from an MDM / device-trust service (a JWT in a configured
   header, verified with that service's own keys): device id, managed, compliant,
   platform. Short-lived (``max_lifetime_s``), with a ``jti``; a ``jti`` seen before from
   another client address is a replay;
3. the device cookie the service issues after a completed step-up (``DeviceCookies``):
   random, MAC'd with a key the service holds, ``__Host-``. A value the client picked, or
   one without a valid MAC, is no device at all.

Posture (managed, compliant) comes only from a valid assertion. A missing, invalid,
expired or replayed assertion leaves the posture unattested (``compliant``/``managed``
None); when the policy depends on posture, the decision core counts unattested as
noncompliant and unmanaged (``authz.core.signals``) -- never a fall-back that passes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from authz.check.tokens import TokenVerifier
from authz.core.attributes import RequestAttributes, cookie_values
from authz.core.signals import Device
from authz.errors import TokenError

log = logging.getLogger("authz.devices")

_CERT_CACHE_SIZE = 4096
_JTI_CACHE_SIZE = 65_536
_DEVICE_ID_MAX = 256
_COOKIE_VERSION = "d1"


def cookie_device_id(value: str) -> str:
    """The device id a device cookie names: a hash of the cookie, never the cookie itself.

    The id is written where a cookie must not be: the audit trail (kept for years on WORM
    storage) and the grant it binds. The cookie holds 18 random bytes, so an unkeyed hash
    cannot be reversed, and a copy of the trail does not let anyone present the device."""
    return "cookie:" + hashlib.sha256(value.encode("ascii", "replace")).hexdigest()[:32]


class DeviceCookies:
    """The service's own device cookie: ``d1.<random>.<mac>``; the MAC is HMAC-SHA256 under
    a key derived from the step-up link key (shared by every replica)."""

    def __init__(self, key: bytes, name: str = "__Host-stepup-device") -> None:
        if len(key) < 32:
            raise ValueError("the device cookie key needs at least 32 bytes")
        self._key = key
        self.name = name

    def _mac(self, nonce: str) -> str:
        raw = hmac.new(self._key, f"{_COOKIE_VERSION}.{nonce}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(raw[:18]).decode("ascii")

    def issue(self) -> tuple[str, str]:
        """(cookie value, device id) for a browser that has no device cookie yet."""
        nonce = secrets.token_urlsafe(18)
        value = f"{_COOKIE_VERSION}.{nonce}.{self._mac(nonce)}"
        return value, cookie_device_id(value)

    def device_id(self, value: str) -> str | None:
        """The device id of a cookie this service issued; None for anything else."""
        if len(value) > 128 or not value.isascii():
            return None
        version, _, rest = value.partition(".")
        nonce, _, mac = rest.partition(".")
        if version != _COOKIE_VERSION or not nonce or not mac:
            return None
        if not hmac.compare_digest(mac, self._mac(nonce)):
            return None
        return cookie_device_id(value)

    def from_header(self, cookie_header: str) -> str | None:
        values = cookie_values(cookie_header, self.name)
        return self.device_id(values[0]) if len(values) == 1 else None


class CertificateTrust:
    """Client certificates chain-verified against the configured device CA."""

    def __init__(self, ca_file: Path) -> None:
        roots = x509.load_pem_x509_certificates(ca_file.read_bytes())
        if not roots:
            raise ValueError(f"{ca_file}: no certificate")
        self._store = Store(roots)

    def verified(self, cert: x509.Certificate, now: datetime) -> bool:
        verifier = PolicyBuilder().store(self._store).time(now).build_client_verifier()
        try:
            verifier.verify(cert, [])
        except (VerificationError, ValueError):
            return False
        return True


def _load_certificate(pem_urlencoded: str) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(unquote(pem_urlencoded).encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return None


def device_of_certificate(cert: x509.Certificate) -> Device:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith("spiffe://") and len(uri) <= _DEVICE_ID_MAX:
                return Device(uri, "mtls")
    except x509.ExtensionNotFound:
        pass
    fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    return Device(f"sha256:{fingerprint}", "mtls")


def xfcc_certificate(header: str) -> str:
    """The ``Cert=`` element of the first ``x-forwarded-client-cert`` entry Envoy set
    (``forward_client_cert_details: SANITIZE_SET``, ``set_current_client_cert_details:
    {cert: true}``): the URL-encoded PEM, or ""."""
    entry = header.split(",", 1)[0]
    for part in entry.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key.lower() == "cert":
            return value.strip('"')
    return ""


class DeviceResolver:
    """Turns what a request presents into a Device (or None)."""

    def __init__(
        self,
        *,
        cookies: DeviceCookies | None = None,
        certificates: CertificateTrust | None = None,
        assertion_header: str | None = None,
        assertions: TokenVerifier | None = None,
        assertion_audience: str | None = None,
        assertion_max_lifetime_s: int = 300,
    ) -> None:
        self.cookies = cookies
        self.certificates = certificates
        self.assertion_header = assertion_header.lower() if assertion_header else None
        self.assertions = assertions
        self.assertion_audience = assertion_audience
        self.assertion_max_lifetime_s = assertion_max_lifetime_s
        self._certs: OrderedDict[str, tuple[Device | None, int]] = OrderedDict()
        self._jtis: OrderedDict[str, str] = OrderedDict()  # jti -> first client address

    @property
    def cookie_name(self) -> str | None:
        return self.cookies.name if self.cookies is not None else None

    def _certificate(self, pem: str, now: int) -> Device | None:
        """A verified certificate's device; cached until the certificate expires."""
        hit = self._certs.get(pem)
        if hit is not None and now < hit[1]:
            self._certs.move_to_end(pem)
            return hit[0]
        cert = _load_certificate(pem)
        if cert is None or self.certificates is None:
            return None
        when = datetime.fromtimestamp(now, UTC)
        if not self.certificates.verified(cert, when):
            log.info("client certificate not trusted as a device (chain or validity)")
            self._remember_cert(pem, None, now + 60)
            return None
        device = device_of_certificate(cert)
        self._remember_cert(pem, device, int(cert.not_valid_after_utc.timestamp()))
        return device

    def _remember_cert(self, pem: str, device: Device | None, until: int) -> None:
        self._certs[pem] = (device, until)
        if len(self._certs) > _CERT_CACHE_SIZE:
            self._certs.popitem(last=False)

    async def resolve(self, attrs: RequestAttributes, now: int) -> Device | None:
        return await self.resolve_headers(
            attrs.headers,
            now,
            peer_certificate=attrs.peer_certificate,
            client=str(attrs.source_ip) if attrs.source_ip is not None else "",
        )

    async def resolve_headers(
        self,
        headers: Mapping[str, str],
        now: int,
        *,
        peer_certificate: str = "",
        client: str = "",
    ) -> Device | None:
        """``headers`` with lower-case names; ``peer_certificate`` as Envoy sends it."""
        if peer_certificate and self.certificates is not None:
            device = self._certificate(peer_certificate, now)
            if device is not None:
                return device
        base: Device | None = None
        if self.cookies is not None:
            cookie_id = self.cookies.from_header(headers.get("cookie", ""))
            if cookie_id is not None:
                base = Device(cookie_id, "cookie")
        if self.assertion_header and self.assertions is not None:
            raw = headers.get(self.assertion_header)
            if raw:
                attested = await self._assertion(raw, now, client)
                if attested is not None:
                    return attested
        return base  # posture unattested: the core decides what that means

    async def _assertion(self, token: str, now: int, client: str) -> Device | None:
        assert self.assertions is not None
        try:
            claims = await self.assertions.verify_claims(
                token, now, audience=self.assertion_audience or "", typ=None
            )
        except TokenError as exc:
            log.info("device assertion refused", extra={"reason": str(exc)})
            return None
        jti, iat, exp = claims.get("jti"), claims.get("iat"), claims.get("exp")
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            log.info("device assertion refused", extra={"reason": "no jti"})
            return None
        if not isinstance(iat, int) or not isinstance(exp, int):
            return None
        if exp - iat > self.assertion_max_lifetime_s:
            log.info("device assertion refused", extra={"reason": "lives too long"})
            return None
        first = self._jtis.setdefault(jti, client)
        self._jtis.move_to_end(jti)
        if len(self._jtis) > _JTI_CACHE_SIZE:
            self._jtis.popitem(last=False)
        if first != client:
            log.warning("device assertion replayed from another address", extra={"jti": jti})
            return None
        device_id = claims.get("device_id", claims.get("sub"))
        if not isinstance(device_id, str) or not device_id or len(device_id) > _DEVICE_ID_MAX:
            return None

        def flag(name: str) -> bool | None:
            value = claims.get(name)
            return value if isinstance(value, bool) else None

        platform = claims.get("platform")
        return Device(
            f"mdm:{device_id}",
            "assertion",
            managed=flag("managed"),
            compliant=flag("compliant"),
            platform=platform if isinstance(platform, str) else None,
        )
