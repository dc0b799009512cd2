"""The signed step-up context carried in the /_stepup/start link.

The Check that decides "step-up" knows the device and client IP; /_stepup/start (routed
around ext_authz) does not see the client certificate. The redirect therefore carries
them, HMAC-SHA256-signed with a key shared by all replicas and time-limited, so the grant
recorded at the callback is bound to the device and IP the Check saw -- and a user cannot
bind a grant to a device they do not hold by editing the link.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from pathlib import Path


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ContextSigner:
    def __init__(self, key: bytes, max_age_s: int) -> None:
        if len(key) < 32:
            raise ValueError("the step-up context key needs at least 32 bytes")
        self._key = key
        self.max_age_s = max_age_s

    @classmethod
    def from_file(cls, path: Path | None, max_age_s: int) -> ContextSigner:
        """From a secret file; without one, a random key (a single replica only)."""
        key = path.read_bytes().strip() if path is not None else secrets.token_bytes(32)
        return cls(key, max_age_s)

    def sign(self, *, level: str, device: str | None, ip: str | None, now: int) -> str:
        body = _b64(
            json.dumps(
                {"l": level, "d": device, "ip": ip, "t": now}, separators=(",", ":")
            ).encode()
        )
        mac = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return f"{body}.{_b64(mac)}"

    def verify(self, token: str, *, level: str, now: int) -> tuple[str | None, str | None]:
        """(device, ip) from a valid context for ``level``; ValueError otherwise."""
        body, _, mac = token.partition(".")
        try:
            expected = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(mac)):
                raise ValueError("bad signature")
            doc = json.loads(_unb64(body))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"invalid step-up context: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("l") != level:
            raise ValueError("step-up context for another level")
        t = doc.get("t")
        if not isinstance(t, int) or not now - self.max_age_s <= t <= now + 5:
            raise ValueError("step-up context expired")
        device, ip = doc.get("d"), doc.get("ip")
        return (device if isinstance(device, str) else None, ip if isinstance(ip, str) else None)
