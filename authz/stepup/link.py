"""The signed step-up link: what the Check's redirect to ``/_stepup/start`` carries.

The Check that decides "step-up" knows the session, the device and the client IP;
``/_stepup/start`` (routed around ext_authz) must act for exactly that session. The link
therefore carries, HMAC-SHA256-signed with a key shared by all replicas and time-limited:

- the level;
- the session key H(iss, sub, sid) the Check saw: ``start`` refuses a link opened with
  another session's token (an attacker's link opened by the victim cannot elevate the
  attacker's session, nor overwrite the victim's grant);
- the device and IP the Check saw: for levels with ``bind``, the browser that completes
  the step-up must present the same ones (``authz.core.grants``);
- a random nonce: ``start`` consumes it (once), so a link cannot be reused.

A user cannot edit any of it without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from authz.core.encoding import b64u, unb64u

_DEVICE_COOKIE_CONTEXT = b"stepup-authz device cookie v1"


@dataclass(frozen=True, slots=True)
class LinkContext:
    level: str
    session_key: str
    device: str | None
    ip: str | None
    nonce: str
    issued_at: int


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

    def derived_key(self, context: bytes = _DEVICE_COOKIE_CONTEXT) -> bytes:
        """A key for another purpose (the device cookie's MAC), bound to ``context``."""
        return hmac.new(self._key, context, hashlib.sha256).digest()

    def sign(
        self,
        *,
        level: str,
        session_key: str,
        device: str | None,
        ip: str | None,
        now: int,
        nonce: str | None = None,
    ) -> str:
        doc = {
            "l": level,
            "s": session_key,
            "d": device,
            "ip": ip,
            "t": now,
            "n": nonce or secrets.token_urlsafe(12),
        }
        body = b64u(json.dumps(doc, separators=(",", ":")).encode())
        mac = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return f"{body}.{b64u(mac)}"

    def verify(self, token: str, *, level: str, now: int) -> LinkContext:
        """The context of a valid link for ``level``; ValueError otherwise."""
        body, _, mac = token.partition(".")
        try:
            expected = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, unb64u(mac)):
                raise ValueError("bad signature")
            doc = json.loads(unb64u(body))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"invalid step-up context: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("l") != level:
            raise ValueError("step-up context for another level")
        t = doc.get("t")
        if not isinstance(t, int) or not now - self.max_age_s <= t <= now + 5:
            raise ValueError("step-up context expired")
        session, nonce = doc.get("s"), doc.get("n")
        if not (isinstance(session, str) and session and isinstance(nonce, str) and nonce):
            raise ValueError("step-up context without session or nonce")
        device, ip = doc.get("d"), doc.get("ip")
        return LinkContext(
            level=level,
            session_key=session,
            device=device if isinstance(device, str) else None,
            ip=ip if isinstance(ip, str) else None,
            nonce=nonce,
            issued_at=t,
        )
