"""Attacks a misconfigured Envoy would let through (no ``normalize_path``, no header limits,
no method validation), against the gRPC servicer directly: CheckRequest in, CheckResponse
out. The service must hold on its own, whatever the proxy in front of it forgot.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2

from authz.check.authorizer import Authorizer
from authz.check.grpc_server import AuthorizationServicer
from authz.check.request import attributes_from_http
from authz.check.response import (
    METHOD_OVERRIDE_HEADERS,
    REMOVE_HEADER,
    HttpResponseBuilder,
    ResponseBuilder,
)
from authz.check.tokens import StaticKeySource, TokenVerifier
from authz.config.policy_file import PolicyHolder
from authz.config.settings import OidcSettings
from authz.ops.metrics import Metrics
from authz.store.memory import MemorySessionStore
from tests import builders
from tests.builders import NOW, FakeClock, ec_key, jwks, sign, token_claims

from .helpers import POLICY_FILE

ISS, AUD = "https://idp.example.com", "stepup-demo"
KEY = ec_key("k")


def token(**over: Any) -> str:
    """An mfa sign-in ten minutes old: enough for elevated (900 s), not for high (300 s)."""
    base = {"iss": ISS, "aud": AUD, "sid": "s", "iat": NOW, "exp": NOW + 600, "amr": ["otp"]}
    return sign(KEY, token_claims(NOW, **{**base, "auth_time": NOW - 600, **over}))


@pytest.fixture
def servicer(tmp_path: Path) -> AuthorizationServicer:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY_FILE.read_text())
    tokens = TokenVerifier(
        OidcSettings(issuer=ISS, client_id="c", audience=AUD, algorithms=("ES256",)),
        StaticKeySource(jwks(KEY)),
    )
    authz = Authorizer(
        policy=PolicyHolder(policy),
        tokens=tokens,
        store=MemorySessionStore(FakeClock(NOW)),
        metrics=Metrics(),
        token_cookie="stepup_token",
        leeway=30,
        clock=FakeClock(NOW),
    )
    return AuthorizationServicer(authz, ResponseBuilder())


def check_request(
    path: str,
    *,
    method: str = "GET",
    host: str = "app.example",
    headers: dict[str, str] | None = None,
) -> external_auth_pb2.CheckRequest:
    """From loopback (as Envoy on the same host), with a bearer token()."""
    headers = {"authorization": f"Bearer {token()}", **(headers or {})}
    return builders.check_request(
        path, headers, method=method, host=host, scheme="", ip="127.0.0.1"
    )


def summary(resp: external_auth_pb2.CheckResponse) -> str:
    if resp.HasField("ok_response"):
        level = next(
            h.header.value for h in resp.ok_response.headers if h.header.key == "x-stepup-level"
        )
        return f"allow {level}"
    reason = next(
        h.header.value for h in resp.denied_response.headers if h.header.key == "x-stepup-reason"
    )
    return f"{resp.denied_response.status.code} {reason}"


CASES = [
    # (id, path, method, host, expected) -- the token satisfies elevated, not high
    ("control-elevated-allowed", "/accounts/1", "GET", "app.example", "allow elevated"),
    ("control-high-step-up", "/accounts/1", "DELETE", "app.example", "401 auth-too-old"),
    (
        "unnormalised-dot-dot-decided-canonically",
        "/public/../wires/1",
        "GET",
        "app.example",
        "401 auth-too-old",
    ),
    (
        "unnormalised-encoded-dot-dot",
        "/public/%2e%2e/wires/1",
        "GET",
        "app.example",
        "401 auth-too-old",
    ),
    ("unnormalised-double-slash", "//wires//1", "GET", "app.example", "401 auth-too-old"),
    (
        "servlet-dotdot-semicolon-refused",
        "/public/..;/wires/1",
        "GET",
        "app.example",
        "403 bad-path",
    ),
    ("servlet-dot-semicolon-refused", "/.;/wires/1", "GET", "app.example", "403 bad-path"),
    ("dot-semicolon-trailing-refused", "/wires/.;", "GET", "app.example", "403 bad-path"),
    ("path-parameter-refused", "/wires;x/1", "GET", "app.example", "403 bad-path"),
    ("encoded-slash-refused", "/public%2F..%2Fwires/1", "GET", "app.example", "403 bad-path"),
    ("encoded-backslash-refused", "/public%5C..%5Cwires/1", "GET", "app.example", "403 bad-path"),
    ("raw-backslash-refused", "/public\\..\\wires/1", "GET", "app.example", "403 bad-path"),
    ("fragment-stripped", "/wires/1#x", "GET", "app.example", "401 auth-too-old"),
    ("encoded-nul-refused", "/wires/1%00", "GET", "app.example", "403 bad-path"),
    ("bad-percent-refused", "/wires/%zz", "GET", "app.example", "403 bad-path"),
    ("non-ascii-path-refused", "/wir\u00e9s/1", "GET", "app.example", "403 bad-path"),
    ("relative-path-refused", "wires/1", "GET", "app.example", "403 bad-path"),
    ("empty-path-refused", "", "GET", "app.example", "403 bad-path"),
    ("non-ascii-method-refused", "/accounts/1", "G\u0395T", "app.example", "403 bad-request"),
    (
        "fullwidth-method-refused",
        "/accounts/1",
        "\uff27\uff25\uff34",
        "app.example",
        "403 bad-request",
    ),
    ("method-with-space-refused", "/accounts/1", "GET ", "app.example", "403 bad-request"),
    ("empty-method-refused", "/accounts/1", "", "app.example", "403 bad-request"),
    # Methods are case-sensitive, as Envoy's :method matchers: "get" is not read as GET.
    ("lower-case-method-refused", "/accounts/1", "get", "app.example", "403 method-not-canonical"),
    ("mixed-case-method-refused", "/wires/1", "Post", "app.example", "403 method-not-canonical"),
    ("host-userinfo-refused", "/trading/x", "GET", "evil@trading.example.com", "403 bad-request"),
    (
        "host-two-joined-refused",
        "/trading/x",
        "GET",
        "other.example,trading.example.com",
        "403 bad-request",
    ),
    ("host-double-port-refused", "/trading/x", "GET", "trading.example.com:1:2", "403 bad-request"),
    ("host-percent-refused", "/trading/x", "GET", "trading%2Eexample.com", "403 bad-request"),
    ("host-empty-refused", "/trading/x", "GET", "", "403 bad-request"),
    (
        "host-trailing-dot-port-matched",
        "/trading/x",
        "GET",
        "Trading.Example.com.:443",
        "401 auth-too-old",
    ),
]


@pytest.mark.parametrize(
    ("path", "method", "host", "expected"), [pytest.param(*c[1:], id=c[0]) for c in CASES]
)
async def test_check(
    servicer: AuthorizationServicer,
    path: str,
    method: str,
    host: str,
    expected: str,
    outcome: Callable[[str, str], None],
) -> None:
    resp = await servicer.Check(check_request(path, method=method, host=host), None)
    outcome(expected, summary(resp))
    assert summary(resp) == expected


async def test_too_many_headers_refused(
    servicer: AuthorizationServicer, outcome: Callable[[str, str], None]
) -> None:
    req = check_request("/public/x", headers={f"x-h{i}": "v" for i in range(300)})
    resp = await servicer.Check(req, None)
    outcome("403 bad-request (MAX_HEADERS: a second fence behind Envoy's)", summary(resp))
    assert summary(resp) == "403 bad-request"


async def test_method_override_removed_on_allow(
    servicer: AuthorizationServicer, outcome: Callable[[str, str], None]
) -> None:
    req = check_request("/accounts/1", headers={h: "DELETE" for h in METHOD_OVERRIDE_HEADERS})
    resp = await servicer.Check(req, None)
    removed = set(resp.ok_response.headers_to_remove)
    outcome(
        "allow elevated; every method-override header removed",
        f"{summary(resp)}; removed {sorted(removed)}",
    )
    assert summary(resp) == "allow elevated"
    assert set(METHOD_OVERRIDE_HEADERS) <= removed


def test_http_mode_removes_method_overrides_it_cannot_see(
    outcome: Callable[[str, str], None],
) -> None:
    """Envoy's HTTP mode forwards only allowed_headers, so the service lists the override
    headers for removal on every allow."""
    from authz.config.policy_file import read_policy
    from authz.core.decision import Decision, Outcome

    level = read_policy(POLICY_FILE).policy.by_name["elevated"]
    attrs = attributes_from_http(
        "GET",
        "/check/accounts/1",
        {"host": "app.example", "x-stepup-peer-address": "127.0.0.1"},
        path_prefix="/check",
    )
    answer = HttpResponseBuilder().build(
        Decision(Outcome.ALLOW, "allowed", level=level), attrs, "d"
    )
    removed = {h.strip() for h in dict(answer.headers)[REMOVE_HEADER].split(",")}
    outcome("x-envoy-auth-headers-to-remove lists every method override", str(sorted(removed)))
    assert set(METHOD_OVERRIDE_HEADERS) <= removed


def test_idp_misbehaviour_endpoint_is_off_by_default(outcome: Callable[[str, str], None]) -> None:
    """The dev IdP's TEST-ONLY knobs change only with ``serve --test-knobs``."""
    from authz.devidp import DevIdpConfig, create_app

    paths = {
        r.resource.canonical
        for r in create_app(DevIdpConfig(issuer="http://127.0.0.1:1")).router.routes()
        if r.resource is not None
    }
    with_knobs = {
        r.resource.canonical
        for r in create_app(
            DevIdpConfig(issuer="http://127.0.0.1:1", test_knobs=True)
        ).router.routes()
        if r.resource is not None
    }
    outcome(
        "no /_test/misbehave route unless --test-knobs",
        f"default: {'/_test/misbehave' in paths}; --test-knobs: {'/_test/misbehave' in with_knobs}",
    )
    assert "/_test/misbehave" not in paths and "/_test/misbehave" in with_knobs
