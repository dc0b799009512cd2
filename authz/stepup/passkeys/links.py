"""Signed values the passkey pages carry: the transaction a step-up is for, and when the
step-up began.

``tx``: the Check that refuses a transaction-bound request signs what the page must show and
what the challenge must commit to -- method, host, path, the request digest and the
configured body fields -- and puts it in the step-up link. The page cannot see the original
request (it was a POST the browser did not follow), so this is the only way it learns it;
the signature keeps a user or a script from editing the amount shown while the digest
stays that of another request. It names the session it was made for, and the page refuses
it in any other: a link copied into another sign-in cannot start that sign-in's approval.

``st``: when this step-up began. The page adds it on its first load (a redirect to itself)
and keeps it across reloads, so "a credential enrolled during this step-up" has one fixed
meaning (Keycloak CVE-2023-3597): created at or after ``st``.

Both are ``base64url(JSON).base64url(HMAC-SHA256)`` under a key derived (HKDF, a label of
its own) from the step-up context key, so every replica verifies what another signed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from authz.core.encoding import b64u, unb64u
from authz.core.transactions import TransactionRequest, body_digest, shown_fields

_INFO = b"stepup-authz/v1/passkey-links"
START_MAX_AGE_S = 900  # a step-up page older than this starts over


@dataclass(frozen=True, slots=True)
class Transaction:
    """The request a transaction-bound step-up approves, as the Check signed it."""

    level: str
    method: str
    host: str
    path_and_query: str
    body_sha256: str  # "-" when Envoy did not send the whole body
    digest: str
    shown: tuple[tuple[str, str], ...]
    issued_at: int
    device: str | None = None
    ip: str | None = None

    @property
    def has_body(self) -> bool:
        return self.body_sha256 != "-"


class LinkSigner:
    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the link key needs at least 32 bytes")
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(key)

    @classmethod
    def from_file(cls, path: Path | None) -> LinkSigner:
        """From the step-up context key file; without one, a per-process key."""
        key = path.read_bytes().strip() if path is not None else secrets.token_bytes(32)
        return cls(key)

    def _sign(self, doc: dict[str, Any]) -> str:
        body = b64u(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{b64u(hmac.new(self._key, body.encode(), hashlib.sha256).digest())}"

    def _open(self, token: str) -> dict[str, Any]:
        body, _, mac = token.partition(".")
        try:
            expected = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, unb64u(mac)):
                raise ValueError("bad signature")
            doc = json.loads(unb64u(body))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"invalid link value: {exc}") from exc
        if not isinstance(doc, dict):
            raise ValueError("invalid link value")
        return doc

    # -- tx -------------------------------------------------------------------------------

    def sign_transaction(
        self,
        *,
        level: str,
        session: str,
        request: TransactionRequest,
        fields: tuple[str, ...],
        now: int,
        device: str | None = None,
        ip: str | None = None,
    ) -> str:
        """For the Check: the ``tx`` parameter of the step-up link for ``request``."""
        return self._sign(
            {
                "k": "tx",
                "l": level,
                "s": session,
                "m": request.method.upper(),
                "h": request.host,
                "p": request.path_and_query,
                "b": body_digest(request.body),
                "dg": request.digest,
                "f": [list(p) for p in shown_fields(request.body, fields)],
                "t": now,
                "d": device,
                "ip": ip,
            }
        )

    def transaction(
        self, token: str, *, level: str, session: str, now: int, max_age_s: int
    ) -> Transaction:
        """The signed request; ValueError for another level or session, edited, or too old."""
        doc = self._open(token)
        if doc.get("k") != "tx" or doc.get("l") != level:
            raise ValueError("a transaction link for another level")
        if doc.get("s") != session:
            raise ValueError("a transaction link made for another sign-in")
        t = doc.get("t")
        if not isinstance(t, int) or not now - max_age_s <= t <= now + 5:
            raise ValueError("the transaction link has expired")
        shown = doc.get("f")
        if not isinstance(shown, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
            for p in shown
        ):
            raise ValueError("invalid transaction fields")
        strs = [doc.get(k) for k in ("m", "h", "p", "b", "dg")]
        if not all(isinstance(x, str) for x in strs):
            raise ValueError("invalid transaction link")
        m, h, p, b, dg = (str(x) for x in strs)
        device, ip = doc.get("d"), doc.get("ip")
        return Transaction(
            level=level,
            method=m,
            host=h,
            path_and_query=p,
            body_sha256=b,
            digest=dg,
            shown=tuple((a, v) for a, v in shown),
            issued_at=t,
            device=device if isinstance(device, str) else None,
            ip=ip if isinstance(ip, str) else None,
        )

    # -- st -------------------------------------------------------------------------------

    def sign_start(self, *, level: str, session: str, now: int) -> str:
        return self._sign({"k": "st", "l": level, "s": session, "t": now})

    def start(self, token: str, *, level: str, session: str, now: int) -> int:
        """When the step-up began; ValueError for another level or session, or too old."""
        doc = self._open(token)
        if doc.get("k") != "st" or doc.get("l") != level or doc.get("s") != session:
            raise ValueError("a step-up start for another level or session")
        t = doc.get("t")
        if not isinstance(t, int) or not now - START_MAX_AGE_S <= t <= now + 5:
            raise ValueError("the step-up page has expired")
        return t
