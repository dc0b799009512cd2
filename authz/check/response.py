"""Decision -> CheckResponse: statuses, redirects, RFC 9470 challenges, identity headers.

Who gets what (DESIGN.md): browsers (Accept: text/html, safe methods) are redirected;
API clients get 401 with a ``WWW-Authenticate: Bearer`` challenge, and for step-up the
RFC 9470 section 3 ``insufficient_user_authentication`` error with ``acr_values`` and
``max_age``; gRPC clients get the same 401/403, which Envoy turns into UNAUTHENTICATED /
PERMISSION_DENIED. Every denial carries ``x-stepup-reason`` and ``x-stepup-decision-id``;
the same id, outcome and reason go into dynamic metadata for Envoy's access log.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2

from authz.check.redirects import Redirects
from authz.core.attributes import RequestAttributes
from authz.core.decision import Decision, Outcome

HEADER_PREFIX = "x-stepup-"
# Method-override headers (Google/most frameworks, OData, IBM): an upstream honouring one
# would execute another method than the one the policy decided on (GET + override DELETE
# passes as a GET). They never reach the upstream of an allowed request.
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_SAFE_METHODS = frozenset({"GET", "HEAD"})
_REALM = 'realm="stepup-authz"'


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
    reason = str(d.reason)
    headers = [
        ("x-stepup-reason", reason),
        ("x-stepup-decision-id", decision_id),
        ("cache-control", "no-store"),
    ]
    if d.outcome in (Outcome.LOGIN, Outcome.STEP_UP):
        if (
            attrs is not None
            and attrs.accepts_html
            and not attrs.is_grpc
            and attrs.method in _SAFE_METHODS
        ):
            headers.append(("location", redirects.target(d, attrs)))
            return 302, headers, ""
        if d.outcome is Outcome.STEP_UP:
            www = (challenge or rfc9470_challenge)(d.acr_values, d.max_age)
        elif reason == "no-credentials":
            www = "Bearer " + _REALM
        else:
            www = f'Bearer {_REALM}, error="invalid_token", error_description="{reason}"'
        headers.append(("www-authenticate", www))
        status, error = 401, "unauthorized"
    elif d.outcome is Outcome.ERROR:
        status, error = error_status, "unavailable"
    else:
        status, error = 403, "forbidden"
    headers.append(("content-type", "application/json"))
    return (
        status,
        headers,
        json.dumps({"error": error, "reason": reason, "decision_id": decision_id}),
    )


class ResponseBuilder:
    def __init__(
        self,
        *,
        path_prefix: str = "/_stepup",
        error_status: int = 403,
        redirects: Redirects | None = None,
    ) -> None:
        self.redirects = redirects or Redirects(path_prefix)
        self.error_status = error_status

    def build(
        self, decision: Decision, attrs: RequestAttributes | None, decision_id: str
    ) -> external_auth_pb2.CheckResponse:
        # Filled in place (add() and field writes): passing built sub-messages to the
        # constructors copies each one, which made a response cost ~4x more.
        resp = external_auth_pb2.CheckResponse()
        fields = resp.dynamic_metadata.fields
        fields["decision_id"].string_value = decision_id
        fields["outcome"].string_value = decision.outcome.value
        fields["reason"].string_value = str(decision.reason)
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
        set_headers = {
            "x-stepup-level": d.level.name if d.level is not None else "",
            "x-stepup-decision-id": decision_id,
            "x-stepup-risk": str(d.risk),
        }
        if d.identity is not None:
            set_headers["x-stepup-user"] = d.identity.subject
            set_headers["x-stepup-issuer"] = d.identity.issuer
            ev = d.evidence or d.identity.evidence
            set_headers["x-stepup-acr"] = ev.acr or ""
            set_headers["x-stepup-auth-time"] = str(ev.auth_time or "")
        # Identity headers come only from us: drop every client-sent x-stepup-* we
        # do not overwrite ourselves; and method overrides, always (the HTTP mode does not
        # see them, and both modes answer alike).
        remove = []
        if attrs is not None:
            remove = [
                h for h in attrs.headers if h.startswith(HEADER_PREFIX) and h not in set_headers
            ]
        remove += METHOD_OVERRIDE_HEADERS
        resp.status.code = code_pb2.OK
        ok = resp.ok_response
        _add_headers(ok.headers, set_headers.items())
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
