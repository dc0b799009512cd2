"""base64url without padding (RFC 4648 section 5, as JOSE and WebAuthn use it): one pair
of functions for the signed links, the passkey records and the credential store."""

from __future__ import annotations

import base64
import re

_B64U = re.compile(r"^[A-Za-z0-9_-]*$")


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unb64u(text: str) -> bytes:
    """Strict base64url without padding; ValueError on any other character (the standard
    library's decoder would silently drop them)."""
    if not _B64U.match(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
