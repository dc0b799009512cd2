"""Who may call the Sessions API: an allowlisted client certificate, or a bearer secret.

- mTLS: the gRPC listener verifies the certificate chain against its client CA; here the
  peer's subject CN or any subject alternative name (DNS, URI such as a SPIFFE id, IP) must
  be in ``allowed_peers``. A certificate from the CA alone is not enough: Envoy and other
  mesh clients of ext_authz share that CA and must not record grants.
- Bearer: ``authorization: Bearer <secret>`` metadata, compared in constant time with the
  secret read from a file at start. Send it only over TLS (or loopback).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

import grpc

_BEARER = b"bearer "


class CallerAuth:
    """Authenticates one call; ``identify`` returns the caller's name for the audit trail."""

    def __init__(
        self, *, allowed_peers: Iterable[str] = (), bearer_secret: bytes | None = None
    ) -> None:
        if bearer_secret is not None and len(bearer_secret) < 16:
            raise ValueError("the API bearer secret must be at least 16 bytes")
        self.allowed_peers = frozenset(allowed_peers)
        self._secret = bearer_secret
        if not self.allowed_peers and self._secret is None:
            raise ValueError("the Sessions API needs allowed_peers or a bearer secret")

    @classmethod
    def from_files(
        cls, *, allowed_peers: Iterable[str] = (), bearer_secret_file: Path | None = None
    ) -> CallerAuth:
        secret = None
        if bearer_secret_file is not None:
            secret = bearer_secret_file.read_bytes().strip()
        return cls(allowed_peers=allowed_peers, bearer_secret=secret)

    def identify(self, context: grpc.aio.ServicerContext) -> str | None:
        """ "peer:<name>" or "bearer", or None when the caller is not authenticated."""
        if self.allowed_peers:
            for name in _peer_names(context):
                if name in self.allowed_peers:
                    return f"peer:{name}"
        if self._secret is not None:
            for key, value in context.invocation_metadata() or ():
                if key != "authorization":
                    continue
                raw = value.encode() if isinstance(value, str) else bytes(value)
                if raw[: len(_BEARER)].lower() == _BEARER and hmac.compare_digest(
                    raw[len(_BEARER) :].strip(), self._secret
                ):
                    return "bearer"
        return None


def _peer_names(context: grpc.aio.ServicerContext) -> list[str]:
    """The verified client certificate's CN and SANs (empty without mTLS)."""
    auth = context.auth_context() or {}
    if b"ssl" not in auth.get("transport_security_type", []):
        return []
    names: list[str] = []
    for prop in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(prop, []):
            names.append(value.decode(errors="replace"))
    return names
