"""The way back to the page the user wanted, carried in the OIDC ``state`` itself.

The step-up state in Redis is one-time and short-lived (``stepup.state_ttl_s``); the
callback URL is not: a reload after success, Back into an old sign-in page, or a sign-in
page left open past the TTL all come back with a state that is gone. So that none of them
ends at a dead "start again from /", the ``state`` sent to the IdP is
``<state id>.<hint>.<mac>``: the hint names the return path and the level, HMAC-SHA256'd
with a key derived from the step-up link key (shared by every replica) and dated. It is
only a hint: it grants nothing, the callback re-checks the path (same origin, relative,
``safe_return_path``) and the page it leads to is asked of the Check again, which restarts
the step-up there when it is still needed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from authz.core.encoding import b64u, unb64u
from authz.stepup.link import ContextSigner

_CONTEXT = b"stepup-authz way back v1"
MAX_AGE_S = 86_400  # a sign-in page left open over a day still finds its way back


@dataclass(frozen=True, slots=True)
class WayBack:
    return_path: str
    level: str | None


class WayBackSigner:
    def __init__(self, signer: ContextSigner, max_age_s: int = MAX_AGE_S) -> None:
        self._key = signer.derived_key(_CONTEXT)
        self.max_age_s = max_age_s

    def _mac(self, state_id: str, body: str) -> bytes:
        return hmac.new(self._key, f"{state_id}.{body}".encode(), hashlib.sha256).digest()

    def seal(self, state_id: str, return_path: str, level: str | None, now: int) -> str:
        """The ``state`` parameter for ``state_id`` (which holds no '.')."""
        doc = {"p": return_path, "l": level, "t": now}
        body = b64u(json.dumps(doc, separators=(",", ":")).encode())
        return f"{state_id}.{body}.{b64u(self._mac(state_id, body))}"

    def open(self, state: str, now: int) -> tuple[str, WayBack | None]:
        """(state id, the way back when the hint verifies and is not too old)."""
        state_id, _, rest = state.partition(".")
        body, _, mac = rest.partition(".")
        if not body or not mac:
            return state_id, None
        try:
            if not hmac.compare_digest(self._mac(state_id, body), unb64u(mac)):
                return state_id, None
            doc = json.loads(unb64u(body))
        except (ValueError, UnicodeDecodeError):
            return state_id, None
        if not isinstance(doc, dict):
            return state_id, None
        path, level, t = doc.get("p"), doc.get("l"), doc.get("t")
        if not isinstance(path, str) or not isinstance(t, int):
            return state_id, None
        if not now - self.max_age_s <= t <= now + 60:
            return state_id, None
        return state_id, WayBack(path, level if isinstance(level, str) else None)
