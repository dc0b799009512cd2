"""Device identity at the edge, strongest source first:

1. the mTLS client certificate Envoy forwards (``include_peer_certificate``): its SPIFFE
   URI SAN, else ``sha256:<fingerprint>`` of the certificate;
2. a signed device assertion from an MDM / device-trust service (a JWT in a configured
   header, verified with that service's own keys): device id, managed, compliant, platform;
3. the device cookie stepup-authz sets after a completed step-up (a random id: it names
   a device, it proves nothing by itself -- "known" means known *for this user*).

A malformed certificate or assertion is not an identity: the next source is tried, and
the assertion's failure is reported so rules can treat the device as unknown.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from authz.check.tokens import TokenVerifier
from authz.core.attributes import RequestAttributes, cookie_values
from authz.core.signals import Device
from authz.errors import TokenError

log = logging.getLogger("authz.devices")

_CERT_CACHE_SIZE = 4096
_DEVICE_ID_MAX = 256


def device_from_certificate(pem_urlencoded: str) -> Device | None:
    """The device named by a client certificate, or None when there is none / it is bad."""
    if not pem_urlencoded:
        return None
    try:
        cert = x509.load_pem_x509_certificate(unquote(pem_urlencoded).encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith("spiffe://") and len(uri) <= _DEVICE_ID_MAX:
                return Device(uri, "mtls")
    except x509.ExtensionNotFound:
        pass
    fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    return Device(f"sha256:{fingerprint}", "mtls")


def cookie_device_id(value: str) -> str:
    """The device id a device cookie names: a hash of the cookie, never the cookie itself.

    The id is written where a cookie must not be: the audit trail (kept for years on WORM
    storage) and the grant it binds. The cookie is 24 random bytes, so an unkeyed hash
    cannot be reversed, and a copy of the trail does not let anyone present the device."""
    return "cookie:" + hashlib.sha256(value.encode("ascii", "replace")).hexdigest()[:32]


class DeviceResolver:
    """Turns request attributes into a Device (or None). Certificates are parsed once
    (bounded cache); assertions are verified through a TokenVerifier of their own."""

    def __init__(
        self,
        *,
        cookie_name: str | None = "stepup_device",
        assertion_header: str | None = None,
        assertions: TokenVerifier | None = None,
        assertion_audience: str | None = None,
    ) -> None:
        self.cookie_name = cookie_name
        self.assertion_header = assertion_header.lower() if assertion_header else None
        self.assertions = assertions
        self.assertion_audience = assertion_audience
        self._certs: OrderedDict[str, Device | None] = OrderedDict()

    def _certificate(self, pem: str) -> Device | None:
        if pem in self._certs:
            self._certs.move_to_end(pem)
            return self._certs[pem]
        device = device_from_certificate(pem)
        self._certs[pem] = device
        if len(self._certs) > _CERT_CACHE_SIZE:
            self._certs.popitem(last=False)
        return device

    async def resolve(self, attrs: RequestAttributes, now: int) -> Device | None:
        if attrs.peer_certificate:
            device = self._certificate(attrs.peer_certificate)
            if device is not None:
                return device
        if self.assertion_header and self.assertions is not None:
            raw = attrs.headers.get(self.assertion_header)
            if raw:
                device = await self._assertion(raw, now)
                if device is not None:
                    return device
        if self.cookie_name:
            values = cookie_values(attrs.headers.get("cookie", ""), self.cookie_name)
            if len(values) == 1 and 16 <= len(values[0]) <= 64 and values[0].isascii():
                return Device(cookie_device_id(values[0]), "cookie")
        return None

    async def _assertion(self, token: str, now: int) -> Device | None:
        assert self.assertions is not None
        try:
            claims = await self.assertions.verify_claims(
                token, now, audience=self.assertion_audience or "", typ=None
            )
        except TokenError as exc:
            log.info("device assertion refused", extra={"reason": str(exc)})
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
