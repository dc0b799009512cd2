"""Envoy's HTTP ext_authz protocol: request -> RequestAttributes, Decision -> raw response.

The same decisions as the gRPC mode (``envoy_in`` / ``envoy_out``), over the protocol of
``ExtAuthz.http_service``. What Envoy sends us (``ext_authz_http_impl.cc``, checked against
Envoy 1.40 in ``tests/e2e/test_http_mode.py``):

* the **original method** (no body, ``content-length: 0``);
* the original ``:path`` with ``http_service.path_prefix`` in front;
* ``host`` = the original ``:authority``;
* only the headers that ``authorization_request.allowed_headers`` lets through (plus
  ``authorization``), and the ``headers_to_add`` entries, which overwrite any client value
  of the same name and may use Envoy's substitution formatters.

Envoy's view of the peer is not sent by default. ``envoy/demo-http.yaml`` adds it with
``authorization_request.headers_to_add``: ``x-stepup-peer-address`` set to
``%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%``, the same address the gRPC mode reads from
``attributes.source.address`` (the TCP peer, or the XFF-derived address when the listener
trusts XFF hops). A client-sent header of that name is overwritten, never trusted; a check
without it is refused (fail closed).

Context extensions do not exist in this protocol. A route that must raise its level uses a
per-route ``check_settings.http_service`` whose ``path_prefix`` is ``<prefix>@<level>``
(e.g. ``/check@high``): the path then reads ``/check@high/wires/1``. The character after
the prefix is ``/`` for a plain check and ``@`` for a level, so no original path (which
always starts with ``/``) can be read as a level. The level only raises, exactly like
``context_extensions.stepup_level``.

Answers: 200 allows; Envoy copies the ``allowed_upstream_headers`` onto the upstream
request and removes the names listed in ``x-envoy-auth-headers-to-remove``. Any other
status denies, and Envoy sends it to the client with the ``allowed_client_headers`` and our
body. ``x-stepup-decision-id``, ``x-stepup-outcome``, ``x-stepup-reason`` and
``x-stepup-level`` feed ``dynamic_metadata_from_headers`` (the access log's join key).
A 5xx answer is an ext_authz *error* to Envoy, which then answers ``status_on_error``
without our headers: ``stepup.error_status: 503`` therefore reaches the client only in the
gRPC mode.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from types import MappingProxyType

from authz.check.redirects import Redirects
from authz.check.response import (
    HEADER_PREFIX,
    METHOD_OVERRIDE_HEADERS,
    denial,
    rfc9470_challenge,
)
from authz.core.attributes import (
    RequestAttributes,
    canonicalize_path,
    client_ip,
    normalize_host,
    parse_ip,
)
from authz.core.decision import CONTEXT_LEVEL_KEY, Decision, Outcome
from authz.errors import RequestError

PEER_HEADER = "x-stepup-peer-address"
# Headers that only feed Envoy's dynamic metadata (never reach the client or upstream,
# since they are in no allowed_* list). "x-stepup-reason" and "-decision-id" are also
# client headers on a denial; "x-stepup-level" is also an upstream header on an allow.
METADATA_HEADERS = ("x-stepup-decision-id", "x-stepup-outcome", "x-stepup-reason", "x-stepup-level")
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"

_LEVEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"


# ---------------------------------------------------------------------------------------
# request -> attributes


def attributes_from_http(
    method: str,
    target: str,
    headers: Mapping[str, str],
    *,
    path_prefix: str,
    peer_header: str = PEER_HEADER,
    trusted_hops: int = 0,
) -> RequestAttributes:
    """Build the attributes from one check request; raises RequestError to refuse it.

    ``headers`` has lower-case names (one value each: Envoy joins repeats with ``,`` before
    sending). The path after ``path_prefix`` is canonicalised exactly like the gRPC mode.
    """
    # ASCII letters only: str.isalpha() is Unicode-aware, and an RFC 9110 method token
    # never holds anything else (found by tests/fuzz/fuzz_envoy_in.py).
    if not method or not method.isascii() or not method.isalpha():
        raise RequestError("missing or invalid method", reason="bad-request")
    if not target.startswith(path_prefix):
        raise RequestError("check path outside the configured prefix", reason="bad-request")
    rest = target[len(path_prefix) :]
    context: Mapping[str, str] = _NO_CONTEXT
    if rest.startswith("@"):
        level, slash, original = rest[1:].partition("/")
        if not slash or _LEVEL.fullmatch(level) is None:
            raise RequestError("invalid level segment in the check path", reason="bad-request")
        rest = "/" + original
        context = MappingProxyType({CONTEXT_LEVEL_KEY: level})
    path, query = canonicalize_path(rest)
    host = normalize_host(headers.get("host", ""))
    if not host:
        raise RequestError("missing host", reason="bad-request")
    peer = headers.get(peer_header)
    if not peer or parse_ip(peer) is None:
        # Envoy's headers_to_add always sets it; without it the IP rules cannot be applied.
        raise RequestError(f"missing or invalid {peer_header}", reason="bad-request")
    source_ip = client_ip(peer, headers.get("x-forwarded-for"), trusted_hops)
    return RequestAttributes(
        method=method.upper(),
        scheme=headers.get("x-forwarded-proto", "http"),
        host=host,
        path=path,
        query=query,
        headers=MappingProxyType(dict(headers)),
        source_ip=source_ip,
        context_extensions=context,
        request_id=headers.get("x-request-id", ""),
    )


_NO_CONTEXT: Mapping[str, str] = MappingProxyType({})


# ---------------------------------------------------------------------------------------
# decision -> response


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """One answer: status and header list (for tests and comparisons) plus the wire bytes."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    wire: bytes


class HttpResponseBuilder:
    """Decision -> HTTP/1.1 response bytes, mirroring ``envoy_out.ResponseBuilder``.

    Static lines are encoded once; challenges are cached per (acr_values, max_age).
    """

    def __init__(
        self,
        *,
        path_prefix: str = "/_stepup",
        error_status: int = 403,
        redirects: Redirects | None = None,
    ) -> None:
        self.redirects = redirects or Redirects(path_prefix)
        self.error_status = error_status
        self._status_lines = {
            code: f"HTTP/1.1 {code} {_reason_phrase(code)}\r\n".encode("latin-1")
            for code in (200, 302, 401, 403, 503, error_status)
        }
        self._challenges: dict[tuple[tuple[str, ...], int | None], str] = {}

    # The gRPC-equivalent headers, in envoy_out's order.
    def headers_for(
        self, decision: Decision, attrs: RequestAttributes | None, decision_id: str
    ) -> tuple[int, list[tuple[str, str]], str]:
        d = decision
        reason = str(d.reason)
        if d.outcome is Outcome.ALLOW:
            headers = [
                ("x-stepup-level", d.level.name if d.level is not None else ""),
                ("x-stepup-decision-id", decision_id),
                ("x-stepup-risk", str(d.risk)),
            ]
            if d.identity is not None:
                ev = d.evidence or d.identity.evidence
                headers += [
                    ("x-stepup-user", d.identity.subject),
                    ("x-stepup-issuer", d.identity.issuer),
                    ("x-stepup-acr", ev.acr or ""),
                    ("x-stepup-auth-time", str(ev.auth_time or "")),
                ]
            remove: list[str] = []
            if attrs is not None:
                ours = {k for k, _ in headers}
                remove = [h for h in attrs.headers if h.startswith(HEADER_PREFIX) and h not in ours]
            # Method overrides are not in allowed_headers, so we cannot see them: always.
            headers.append((REMOVE_HEADER, ", ".join([*remove, *METHOD_OVERRIDE_HEADERS])))
            headers += [("x-stepup-outcome", d.outcome.value), ("x-stepup-reason", reason)]
            return 200, headers, ""
        status, headers, body = denial(
            d,
            attrs,
            decision_id,
            redirects=self.redirects,
            error_status=self.error_status,
            challenge=self._challenge,
        )
        headers += [
            ("x-stepup-outcome", d.outcome.value),
            ("x-stepup-level", d.level.name if d.level is not None else ""),
        ]
        return status, headers, body

    def _challenge(self, acr_values: tuple[str, ...], max_age: int | None) -> str:
        key = (acr_values, max_age)
        found = self._challenges.get(key)
        if found is None:
            if len(self._challenges) > 1024:  # levels are few; bound it all the same
                self._challenges.clear()
            found = self._challenges[key] = rfc9470_challenge(acr_values, max_age)
        return found

    def build(
        self,
        decision: Decision,
        attrs: RequestAttributes | None,
        decision_id: str,
        *,
        close: bool = False,
    ) -> HttpAnswer:
        status, headers, body = self.headers_for(decision, attrs, decision_id)
        raw_body = body.encode()
        return HttpAnswer(
            status, tuple(headers), raw_body, self.encode(status, headers, raw_body, close=close)
        )

    def encode(
        self, status: int, headers: list[tuple[str, str]], body: bytes, *, close: bool = False
    ) -> bytes:
        line = self._status_lines.get(status)
        if line is None:
            line = f"HTTP/1.1 {status} {_reason_phrase(status)}\r\n".encode("latin-1")
        parts = [line]
        for k, v in headers:
            _check_value(v)
            # UTF-8, the bytes Envoy would send for the same gRPC header value.
            parts.append(f"{k}: {v}\r\n".encode())
        parts.append(b"content-length: %d\r\n" % len(body))
        if close:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        parts.append(body)
        return b"".join(parts)


def _check_value(value: str) -> None:
    # Values come from verified tokens and the policy, but a CR/LF must never split a
    # response (RFC 9110 section 5.5): refuse it rather than emit it.
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError("control character in a response header value")


def refusal(builder: HttpResponseBuilder, reason: str, decision_id: str) -> bytes:
    """A 403 for a request we could not read (framing errors): always closes the stream."""
    return builder.build(Decision(Outcome.DENY, reason), None, decision_id, close=True).wire
