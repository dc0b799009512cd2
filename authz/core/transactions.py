"""Transaction binding (dynamic linking): the digest of one request and what a page shows.

A level with ``transaction_bound`` grants one exact request, not a time window: the Check
computes ``request_digest`` of the request it refuses, the passkey challenge commits to
it, and the grant is stored under it and consumed by the Check that presents the same
digest again (once). The same function is used on both sides -- that is the whole rule.

The digest covers the method, the host, the canonical path with the raw query, and the
body: SHA-256 of the body bytes when Envoy sent the whole body, else the marker ``-``
(then a level with ``require_body`` refuses instead). Each part is length-prefixed so no
two different requests share a digest by moving bytes between parts.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from authz.core.attributes import RequestAttributes

DIGEST_VERSION = b"stepup-authz/transaction/v1"
_NO_BODY = b"-"
MAX_SHOWN_CHARS = 200  # one shown value (an amount, a payee) at most this long


@dataclass(frozen=True, slots=True)
class TransactionRequest:
    """The request a transaction-bound grant is for, as the Check saw it."""

    method: str
    host: str
    path_and_query: str
    body: bytes | None = None  # None: Envoy did not send the whole body

    @property
    def digest(self) -> str:
        return request_digest(self.method, self.host, self.path_and_query, self.body)


def of_request(attrs: RequestAttributes) -> TransactionRequest:
    """The request as the Check sees it: canonical path with the raw query, and the body
    only when Envoy sent the whole of it."""
    return TransactionRequest(attrs.method, attrs.host, attrs.path_and_query, attrs.body)


def body_digest(body: bytes | None) -> str:
    """The body's part of the digest: hex SHA-256, or ``-`` for no (whole) body."""
    return "-" if body is None else hashlib.sha256(body).hexdigest()


def request_digest(method: str, host: str, path_and_query: str, body: bytes | None) -> str:
    """Hex SHA-256 over the length-prefixed method, host, path (with query) and body digest."""
    h = hashlib.sha256()
    for part in (
        DIGEST_VERSION,
        method.upper().encode(),
        host.lower().encode(),
        path_and_query.encode(),
        _NO_BODY if body is None else hashlib.sha256(body).digest(),
    ):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.hexdigest()


def shown_fields(body: bytes | None, fields: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The configured fields of a JSON object body, as (name, text) pairs for the page.

    ``a.b`` names a nested field. A scalar is shown as its JSON text (strings without
    quotes); an absent field, an object or a list is shown as ``(not given)`` / ``(complex
    value)`` -- the user must see that the request did not say, rather than nothing. A body
    that is not a JSON object shows every field as ``(not given)``.
    """
    if not fields:
        return ()
    doc: object = None
    if body is not None:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            doc = None
    out: list[tuple[str, str]] = []
    for name in fields:
        node: object = doc
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out.append((name, _text(node)))
    return tuple(out)


def _text(value: object) -> str:
    if value is None:
        return "(not given)"
    if isinstance(value, dict | list):
        return "(complex value)"
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) > MAX_SHOWN_CHARS:
        text = text[: MAX_SHOWN_CHARS - 1] + "\u2026"
    return text
