"""Decision -> Envoy's answer, for both ext_authz modes: statuses, redirects, RFC 9470
challenges, identity headers. ``ResponseBuilder`` writes the gRPC ``CheckResponse``,
``HttpResponseBuilder`` the raw HTTP/1.1 answer of the HTTP mode; both take the headers and
the body of a denial from one definition (``denial``), so the modes cannot drift.

HTTP mode: 200 allows; Envoy copies the ``allowed_upstream_headers`` onto the upstream
request and removes the names listed in ``x-envoy-auth-headers-to-remove``. Any other
status denies, and Envoy sends it to the client with the ``allowed_client_headers`` and our
body. ``x-stepup-decision-id``, ``x-stepup-outcome``, ``x-stepup-reason`` and
``x-stepup-level`` feed ``dynamic_metadata_from_headers`` (the access log's join key). A
5xx answer is an ext_authz *error* to Envoy, which then answers ``status_on_error``
without our headers: ``stepup.error_status: 503`` therefore reaches the client only in the
gRPC mode.


Who gets what (DESIGN.md): browsers (Accept: text/html, safe methods) are redirected, and
so is a browser's request of any method to a transaction-bound level (303, to approve it);
API clients get 401 with a ``WWW-Authenticate: Bearer`` challenge, and for step-up the
RFC 9470 section 3 ``insufficient_user_authentication`` error with ``acr_values`` and
``max_age``; gRPC clients get the same 401/403, which Envoy turns into UNAUTHENTICATED /
PERMISSION_DENIED. Every denial carries ``x-stepup-reason`` and ``x-stepup-decision-id``;
the same id, outcome and reason go into dynamic metadata for Envoy's access log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2

from authz.check.redirects import Redirects
from authz.core.attributes import RequestAttributes
from authz.core.decision import Decision, Outcome
from authz.core.reasons import Reason
from authz.stepup.endpoints import safe_return_path
from authz.stepup.pages import HEADERS as PAGE_HEADERS
from authz.stepup.pages import denial_page

HEADER_PREFIX = "x-stepup-"
_AMR_VALUE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# Method-override headers (Google/most frameworks, OData, IBM): an upstream honouring one
# would execute another method than the one the policy decided on (GET + override DELETE
# passes as a GET). They never reach the upstream of an allowed request.
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_SAFE_METHODS = frozenset({"GET", "HEAD"})
_REALM = 'realm="stepup-authz"'

# HTTP mode: headers that only feed Envoy's dynamic metadata (never reach the client or
# upstream, since they are in no allowed_* list). "x-stepup-reason" and "-decision-id" are
# also client headers on a denial; "x-stepup-level" is also an upstream header on an allow.
METADATA_HEADERS = ("x-stepup-decision-id", "x-stepup-outcome", "x-stepup-reason", "x-stepup-level")
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"


def _add_headers(field: Any, items: Iterable[tuple[str, str]]) -> None:
    """Append OVERWRITE_IF_EXISTS_OR_ADD header options to a repeated field, in place."""
    add = field.add
    for key, value in items:
        option = add()
        header = option.header
        header.key = key
        header.value = value
        option.append_action = _OVERWRITE


def rfc9470_challenge(acr_values: tuple[str, ...], max_age: int | None) -> str:
    """The WWW-Authenticate value of RFC 9470 section 3."""
    parts = [
        "Bearer " + _REALM,
        'error="insufficient_user_authentication"',
        'error_description="A different authentication level is required"',
    ]
    if acr_values:
        parts.append(f'acr_values="{" ".join(acr_values)}"')
    if max_age is not None:
        parts.append(f"max_age={max_age}")
    return ", ".join(parts)


def denial(
    d: Decision,
    attrs: RequestAttributes | None,
    decision_id: str,
    *,
    redirects: Redirects,
    error_status: int,
    challenge: Callable[[tuple[str, ...], int | None], str] | None = None,
) -> tuple[int, list[tuple[str, str]], str]:
    """(HTTP status, headers, body) of a denial: one definition for both ext_authz modes.

    Browsers (safe methods, not gRPC) are redirected to sign in or step up; API and gRPC
    clients get 401 with a Bearer challenge (RFC 9470 for step-up, RFC 6750 otherwise);
    errors get ``error_status``; everything else 403.
    """
    reason = d.slug
    headers = [
        ("x-stepup-reason", reason),
        ("x-stepup-decision-id", decision_id),
        ("cache-control", "no-store"),
    ]
    if d.outcome in (Outcome.LOGIN, Outcome.STEP_UP):
        browser = attrs is not None and attrs.accepts_html and not attrs.is_grpc
        if browser and attrs is not None and attrs.method in _SAFE_METHODS:
            headers.append(("location", redirects.target(d, attrs)))
            return 302, headers, ""
        if browser and attrs is not None and d.reason is Reason.TRANSACTION_REQUIRED:
            # A transaction-bound step-up: the link carries the signed request, so the
            # browser may leave its POST (303: the page is a GET); the user submits it
            # again once approved. Any other unsafe request keeps the page below.
            headers.append(("location", redirects.target(d, attrs)))
            return 303, headers, ""
        if d.outcome is Outcome.STEP_UP:
            www = (challenge or rfc9470_challenge)(d.acr_values, d.max_age)
        elif d.reason == Reason.NO_CREDENTIALS:
            www = "Bearer " + _REALM
        else:
            www = f'Bearer {_REALM}, error="invalid_token", error_description="{reason}"'
        headers.append(("www-authenticate", www))
        status, error = 401, "unauthorized"
    elif d.outcome is Outcome.ERROR:
        status, error = error_status, "unavailable"
        if d.retry_after_s is not None:
            headers.append(("retry-after", str(d.retry_after_s)))
    else:
        status, error = 403, "forbidden"
    if attrs is not None and attrs.accepts_html and not attrs.is_grpc:
        # A browser gets a page (API clients, by their Accept, keep the JSON below).
        headers += [(k.lower(), v) for k, v in PAGE_HEADERS.items() if k != "Cache-Control"]
        headers.append(("content-type", "text/html; charset=utf-8"))
        back = safe_return_path(attrs.path_and_query, "/")
        return (
            status,
            headers,
            denial_page(
                status,
                reason,
                decision_id,
                back=back,
                unavailable=d.outcome is Outcome.ERROR,
                level=d.level,
            ),
        )
    headers.append(("content-type", "application/json"))
    return (
        status,
        headers,
        json.dumps({"error": error, "reason": reason, "decision_id": decision_id}),
    )


def without_cookies(header: str, names: frozenset[str]) -> str | None:
    """The Cookie header without the cookies named ``names`` (RFC 6265 section 5.4
    syntax); None when nothing of it is left."""
    kept = [
        part.strip()
        for part in header.split(";")
        if part.strip() and part.strip().partition("=")[0].strip() not in names
    ]
    return "; ".join(kept) if kept else None


def allowance(
    d: Decision,
    attrs: RequestAttributes | None,
    decision_id: str,
    strip_cookies: frozenset[str] = frozenset(),
) -> tuple[list[tuple[str, str]], list[str]]:
    """(headers set on the upstream request, headers removed from it) of an allow: one
    definition for both ext_authz modes.

    Identity headers come only from us: every client-sent ``x-stepup-*`` we do not set
    ourselves is removed, and so are method overrides, always (the HTTP mode cannot see
    them, since they are not in its allowed headers, and both modes answer alike).
    Credentials never reach the upstream: the cookies in ``strip_cookies`` (the session's
    token, the device and state cookies) are cut out of the forwarded Cookie header.
    """
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
            # RFC 8176 values of the evidence the allow rests on (e.g. "hwk user pin mfa"
            # after a passkey step-up), space-separated; a value that is not a plain
            # token (a space or control character from an IdP) is left out, never split.
            ("x-stepup-amr", " ".join(a for a in ev.amr if _AMR_VALUE.fullmatch(a))),
        ]
    remove: list[str] = []
    if attrs is not None:
        ours = {k for k, _ in headers}
        remove = [h for h in attrs.headers if h.startswith(HEADER_PREFIX) and h not in ours]
    remove += METHOD_OVERRIDE_HEADERS
    cookie = attrs.headers.get("cookie") if attrs is not None else None
    if cookie and strip_cookies and any(name in cookie for name in strip_cookies):
        rest = without_cookies(cookie, strip_cookies)
        if rest is None:
            remove.append("cookie")
        elif rest != cookie:
            headers.append(("cookie", rest))
    return headers, remove


class ResponseBuilder:
    def __init__(
        self,
        *,
        path_prefix: str = "/_stepup",
        error_status: int = 403,
        redirects: Redirects | None = None,
        strip_cookies: tuple[str, ...] = (),
    ) -> None:
        self.redirects = redirects or Redirects(path_prefix)
        self.error_status = error_status
        self.strip_cookies = frozenset(strip_cookies)

    def build(
        self, decision: Decision, attrs: RequestAttributes | None, decision_id: str
    ) -> external_auth_pb2.CheckResponse:
        # Filled in place (add() and field writes): passing built sub-messages to the
        # constructors copies each one, which made a response cost ~4x more.
        resp = external_auth_pb2.CheckResponse()
        fields = resp.dynamic_metadata.fields
        fields["decision_id"].string_value = decision_id
        fields["outcome"].string_value = decision.outcome.value
        fields["reason"].string_value = decision.slug
        fields["level"].string_value = decision.level.name if decision.level is not None else ""
        if decision.outcome is Outcome.ALLOW:
            return self._allow(decision, attrs, decision_id, resp)
        return self._denied(decision, attrs, decision_id, resp)

    def _allow(
        self,
        d: Decision,
        attrs: RequestAttributes | None,
        decision_id: str,
        resp: external_auth_pb2.CheckResponse,
    ) -> external_auth_pb2.CheckResponse:
        set_headers, remove = allowance(d, attrs, decision_id, self.strip_cookies)
        resp.status.code = code_pb2.OK
        ok = resp.ok_response
        _add_headers(ok.headers, set_headers)
        ok.headers_to_remove.extend(remove)
        return resp

    def _denied(
        self,
        d: Decision,
        attrs: RequestAttributes | None,
        decision_id: str,
        resp: external_auth_pb2.CheckResponse,
    ) -> external_auth_pb2.CheckResponse:
        status, headers, body = denial(
            d, attrs, decision_id, redirects=self.redirects, error_status=self.error_status
        )
        if d.outcome in (Outcome.LOGIN, Outcome.STEP_UP):
            rpc_code = code_pb2.UNAUTHENTICATED
        elif d.outcome is Outcome.ERROR and status == 503:
            rpc_code = code_pb2.UNAVAILABLE
        else:
            rpc_code = code_pb2.PERMISSION_DENIED
        resp.status.code = rpc_code
        denied = resp.denied_response
        denied.status.code = status
        _add_headers(denied.headers, headers)
        denied.body = body
        return resp


# -- HTTP ext_authz mode ------------------------------------------------------------------


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
        strip_cookies: tuple[str, ...] = (),
    ) -> None:
        self.redirects = redirects or Redirects(path_prefix)
        self.error_status = error_status
        self.strip_cookies = frozenset(strip_cookies)
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
        reason = d.slug
        if d.outcome is Outcome.ALLOW:
            headers, remove = allowance(d, attrs, decision_id, self.strip_cookies)
            headers.append((REMOVE_HEADER, ", ".join(remove)))
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


def refusal(builder: HttpResponseBuilder, reason: Reason, decision_id: str) -> bytes:
    """A 403 for a request we could not read (framing errors): always closes the stream."""
    return builder.build(Decision(Outcome.DENY, reason), None, decision_id, close=True).wire
