"""Paths, hosts, methods and headers through the real Envoy (raw HTTP/1.1, bytes as written).

The invariant behind every path case: whenever the upstream is reached, the policy level
that was enforced is at least the level the policy gives *any* reasonable reading of the
path the upstream received (as received, RFC 3986-canonical, and a servlet container's
``;``-stripping view). The client holds a valid token with ``acr=pwd``: it satisfies
``standard`` and nothing above.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from authz.core.attributes import canonicalize_path
from authz.demo.stack import Stack

from .helpers import Minter, RawResponse, policy, raw_request, upstream_rank

pytestmark = pytest.mark.e2e

POLICY = policy()
STANDARD = POLICY.by_name["standard"].rank


@pytest.fixture
def weak(minter: Minter) -> list[tuple[str | bytes, str | bytes]]:
    return [("Authorization", f"Bearer {minter.token(acr='pwd', amr=['pwd'])}")]


@pytest.fixture
def elevated_only(minter: Minter) -> list[tuple[str | bytes, str | bytes]]:
    """mfa ten minutes ago: enough for ``elevated`` (900 s), not for ``high`` (300 s)."""
    t = minter.token(auth_time=int(time.time()) - 600)
    return [("Authorization", f"Bearer {t}")]


def enforced_safely(r: RawResponse, host: str, method: str) -> None:
    """If the upstream was reached, the level enforced covers what the upstream saw."""
    echo = r.echo()
    if echo is None:
        return
    seen = echo["path"] + (f"?{echo['query']}" if echo["query"] else "")
    rank = upstream_rank(POLICY, host, method, seen)
    assert rank <= STANDARD, f"upstream served {seen!r} (policy rank {rank}) on an acr=pwd token"
    # The level the service announced is the policy's level for exactly that path.
    path = canonicalize_path(seen)[0]
    route = POLICY.route_for(host, method, path)
    level = route.level if route is not None else POLICY.default_level
    assert echo["headers"]["x-stepup-level"] == level.name


# -- paths -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathCase:
    id: str
    target: str
    expect: set[str]  # acceptable "status reason" strings ("400": Envoy refused it)
    method: str = "GET"


PATH_CASES = [
    PathCase("control-accounts-step-up", "/accounts/1", {"401 acr-insufficient"}),
    PathCase("encoded-slash-%2F-refused-by-envoy", "/accounts%2F1", {"400"}),
    PathCase("encoded-slash-lower-%2f-refused", "/public%2f..%2faccounts/1", {"400"}),
    PathCase("encoded-backslash-%5C-refused", "/public%5C..%5Caccounts/1", {"400"}),
    PathCase("raw-backslash-is-a-slash-step-up", "/accounts\\1", {"401 acr-insufficient"}),
    PathCase("double-slash-merged-step-up", "//accounts//1", {"401 acr-insufficient"}),
    PathCase("dot-segment-step-up", "/./accounts/./1", {"401 acr-insufficient"}),
    PathCase("dot-dot-from-public-step-up", "/public/../accounts/1", {"401 acr-insufficient"}),
    PathCase("encoded-dot-dot-step-up", "/public/%2e%2e/accounts/1", {"401 acr-insufficient"}),
    PathCase("mixed-encoded-dot-dot-step-up", "/public/.%2E/accounts/1", {"401 acr-insufficient"}),
    PathCase(
        "servlet-dotdot-semicolon-step-up",
        "/public/..;/accounts/1",
        {"401 acr-insufficient", "403 bad-path"},
    ),
    PathCase(
        "servlet-dot-semicolon-step-up", "/.;/accounts/1", {"401 acr-insufficient", "403 bad-path"}
    ),
    PathCase(
        "servlet-dot-semicolon-trailing-step-up",
        "/accounts/.;",
        {"401 acr-insufficient", "403 bad-path"},
    ),
    PathCase("path-parameter-on-prefix-refused", "/accounts;x/1", {"403 bad-path"}),
    PathCase("empty-path-parameter-refused", "/accounts;/1", {"403 bad-path"}),
    PathCase("jsessionid-parameter-refused", "/accounts;jsessionid=ABC/1", {"403 bad-path"}),
    PathCase("path-parameter-on-regex-route-refused", "/clients/7/statements;x", {"403 bad-path"}),
    PathCase("path-parameter-on-last-segment-refused", "/accounts/1;x", {"403 bad-path"}),
    PathCase("encoded-semicolon-is-data-step-up", "/accounts/1%3Bx", {"401 acr-insufficient"}),
    PathCase("fragment-refused-by-envoy", "/accounts/1#frag", {"400"}),
    PathCase("fragment-hiding-dot-dot-refused", "/public/#/../accounts/1", {"400"}),
    PathCase("upper-case-is-another-resource", "/ACCOUNTS/1", {"200"}),
    PathCase("mixed-case-is-another-resource", "/Accounts/1", {"200"}),
    PathCase("percent-encoded-letter-decoded-step-up", "/%61ccounts/1", {"401 acr-insufficient"}),
    PathCase("percent-encoded-digit-decoded-step-up", "/accounts/%31", {"401 acr-insufficient"}),
    PathCase("encoded-nul-refused", "/accounts/1%00", {"400", "403 bad-path"}),
    PathCase("encoded-newline-refused", "/accounts/1%0a", {"400", "403 bad-path"}),
    PathCase("overlong-utf8-dot-is-data", "/public/%c0%ae%c0%ae/accounts/1", {"200"}),
    PathCase(
        "query-dot-dot-ignored-step-up", "/accounts/1?x=/../../public/", {"401 acr-insufficient"}
    ),
    PathCase("query-question-in-path-step-up", "/accounts/1??/public/", {"401 acr-insufficient"}),
    PathCase("asterisk-form-refused", "*", {"400"}),
    PathCase("relative-path-refused", "accounts/1", {"400"}),
    PathCase(
        "absolute-form-uses-its-authority",
        "http://app.example/accounts/1",
        {"401 acr-insufficient"},
    ),
    PathCase(
        "long-path-refused-or-harmless",
        "/accounts/" + "a" * 70_000,
        {"0", "400", "413", "414", "431", "401 acr-insufficient"},
    ),
    PathCase(
        "head-method-same-level-step-up", "/accounts/1", {"401 acr-insufficient"}, method="HEAD"
    ),
    PathCase(
        "unknown-method-step-up-at-default-or-refused",
        "/accounts/1",
        {"401 acr-insufficient", "400"},
        method="PROPFIND",
    ),
]


def _matches(r: RawResponse, expect: set[str]) -> bool:
    return str(r.status) in expect or str(r) in expect


@pytest.mark.parametrize("case", PATH_CASES, ids=[c.id for c in PATH_CASES])
async def test_path(
    sec_stack: Stack,
    weak: list[tuple[str | bytes, str | bytes]],
    case: PathCase,
    outcome: Callable[[str, str], None],
) -> None:
    r = await raw_request(sec_stack.listen_port, case.method, case.target, weak)
    seen = r.echo()
    observed = str(r) + (
        f" upstream saw {seen['path']!r} at {seen['headers']['x-stepup-level']}" if seen else ""
    )
    outcome(
        " or ".join(sorted(case.expect)) + "; never a sensitive upstream path on acr=pwd", observed
    )
    enforced_safely(r, "app.example", case.method)
    assert _matches(r, case.expect), observed


def test_upper_case_path_is_what_the_upstream_sees(outcome: Callable[[str, str], None]) -> None:
    """Envoy's paths are case-sensitive and so is the policy: ``/ACCOUNTS/1`` is another
    resource, served at ``standard``. The upstream receives ``/ACCOUNTS/1`` unchanged (see
    ``test_path[upper-case-is-another-resource]``); an upstream that folds case must be
    covered by case-insensitive routes (``path_regex: '(?i)^/accounts/'``), which this
    asserts the policy language can express."""
    from authz.core.policy import load_policy

    p = load_policy(
        {
            "levels": {"standard": {}, "elevated": {"acr": ["mfa"]}},
            "routes": [{"path_regex": "(?i)/accounts/.*", "level": "elevated"}],
            "default_level": "standard",
        }
    )
    route = p.route_for("app.example", "GET", "/ACCOUNTS/1")
    outcome(
        "a case-insensitive route covers /ACCOUNTS/1",
        f"route level {route.level.name if route else None}",
    )
    assert route is not None and route.level.name == "elevated"


# -- hosts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostCase:
    id: str
    host: str | bytes | None
    expect: set[str]
    extra: tuple[tuple[str, str], ...] = ()


# "404": Envoy serves no virtual host by that name (render envoy serves the policy's hosts
# and the ones named with --host, nothing else), so neither the check nor the upstream sees it.
HOST_CASES = [
    HostCase("control-host-route-step-up", "trading.example.com", {"401 acr-insufficient"}),
    HostCase("trailing-dot-step-up", "trading.example.com.", {"401 acr-insufficient"}),
    HostCase("two-trailing-dots-step-up", "trading.example.com..", {"404", "401 acr-insufficient"}),
    HostCase("upper-case-step-up", "TRADING.Example.COM", {"401 acr-insufficient"}),
    HostCase("explicit-443-step-up", "trading.example.com:443", {"401 acr-insufficient"}),
    HostCase("other-port-step-up", "trading.example.com:8443", {"401 acr-insufficient"}),
    HostCase("trailing-dot-and-port-step-up", "trading.example.com.:443", {"401 acr-insufficient"}),
    HostCase("whitespace-trimmed-step-up", "trading.example.com\t", {"401 acr-insufficient"}),
    HostCase("foreign-host-not-served", "evil.example", {"404"}),
    HostCase("foreign-subdomain-not-served", "x.trading.example.com", {"404"}),
    HostCase(
        "userinfo-in-host-refused",
        "evil.example@trading.example.com",
        {"404", "400", "403 bad-request"},
    ),
    HostCase(
        "double-port-refused", "trading.example.com:443:443", {"404", "400", "403 bad-request"}
    ),
    HostCase(
        "percent-encoded-host-refused", "trading.example.com%2e", {"404", "400", "403 bad-request"}
    ),
    HostCase(
        "semicolon-in-host-refused", "trading.example.com;x", {"404", "400", "403 bad-request"}
    ),
    HostCase("path-in-host-refused", "trading.example.com/x", {"400", "403 bad-request"}),
    HostCase(
        "two-host-headers-refused",
        "other.example",
        {"404", "400", "403 bad-request"},
        extra=(("Host", "trading.example.com"),),
    ),
    HostCase(
        "two-host-headers-reversed-refused",
        "trading.example.com",
        {"404", "400", "403 bad-request", "401 acr-insufficient"},
        extra=(("Host", "other.example"),),
    ),
    HostCase("no-host-refused", None, {"400"}),
    HostCase("empty-host-refused", "", {"404", "400", "403 bad-request"}),
    HostCase("non-utf8-host-refused", b"trading.example.com\xff", {"400", "403 bad-request"}),
]


@pytest.mark.parametrize("case", HOST_CASES, ids=[c.id for c in HOST_CASES])
async def test_host(
    sec_stack: Stack,
    weak: list[tuple[str | bytes, str | bytes]],
    case: HostCase,
    outcome: Callable[[str, str], None],
) -> None:
    r = await raw_request(
        sec_stack.listen_port, "GET", "/trading/x", [*weak, *case.extra], host=case.host
    )
    seen = r.echo()
    observed = str(r) + (f" upstream host {seen['headers'].get('host')!r}" if seen else "")
    outcome(
        " or ".join(sorted(case.expect)) + "; never 200 where any host reading is "
        "trading.example.com",
        observed,
    )
    assert _matches(r, case.expect), observed


# -- method override -------------------------------------------------------------------------

OVERRIDES = ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"]


@pytest.mark.parametrize("name", OVERRIDES)
async def test_method_override_on_get_is_stripped(
    sec_stack: Stack,
    elevated_only: list[tuple[str | bytes, str | bytes]],
    name: str,
    outcome: Callable[[str, str], None],
) -> None:
    """GET + ``<override>: DELETE`` is decided as the GET it is (``elevated``), and the
    upstream never sees the override, so it cannot execute the DELETE (``high``)."""
    port = sec_stack.listen_port
    control = await raw_request(port, "DELETE", "/accounts/1", elevated_only)
    r = await raw_request(port, "GET", "/accounts/1", [*elevated_only, (name, "DELETE")])
    seen = r.echo()
    leaked = seen is not None and name.lower() in seen["headers"]
    outcome(
        "DELETE needs high (401); GET+override allowed at elevated with the override "
        "removed before the upstream",
        f"DELETE {control}; GET+override {r} level "
        f"{seen['headers'].get('x-stepup-level') if seen else None}, "
        f"override {'LEAKED' if leaked else 'stripped'}",
    )
    assert control.status == 401 and control.reason == "auth-too-old"
    assert seen is not None and seen["method"] == "GET"
    assert seen["headers"]["x-stepup-level"] == "elevated"
    assert not leaked, f"{name} reached the upstream"


@pytest.mark.parametrize("name", OVERRIDES)
async def test_method_override_cannot_lower_the_level(
    sec_stack: Stack,
    elevated_only: list[tuple[str | bytes, str | bytes]],
    name: str,
    outcome: Callable[[str, str], None],
) -> None:
    r = await raw_request(
        sec_stack.listen_port, "POST", "/accounts/1", [*elevated_only, (name, "GET")]
    )
    outcome("POST+override GET still needs high: 401", str(r))
    assert r.status == 401 and r.reason == "auth-too-old"


# -- client-sent identity and proxy headers ---------------------------------------------------

FORGED_STEPUP = [
    ("X-Stepup-User", "mallory"),
    ("x-stepup-user", "mallory2"),
    ("X-STEPUP-ACR", "phr"),
    ("X-Stepup-Level", "high"),
    ("X-Stepup-Auth-Time", "9999999999"),
    ("X-Stepup-Amr", "hwk"),
    ("X-Stepup-Issuer", "https://evil.example"),
    ("X-Stepup-Decision-Id", "forged"),
    ("X-Stepup-Extra", "forged"),
    ("X-Stepup-Reason", "allowed"),
    ("X-Stepup-Risk", "0"),
]


async def test_client_stepup_headers_never_reach_the_upstream(
    sec_stack: Stack,
    weak: list[tuple[str | bytes, str | bytes]],
    outcome: Callable[[str, str], None],
) -> None:
    r = await raw_request(sec_stack.listen_port, "GET", "/x", [*weak, *FORGED_STEPUP])
    seen = r.echo()
    assert seen is not None, str(r)
    h = seen["headers"]
    stepup = {k: v for k, v in h.items() if k.startswith("x-stepup-")}
    outcome(
        "allowed at standard; upstream sees only the service's x-stepup-* values",
        f"{r.status}; upstream x-stepup-*: {sorted(stepup)}",
    )
    assert h["x-stepup-user"] == "alice"  # one value: the echo joins repeats with ", "
    assert h["x-stepup-acr"] == "pwd" and h["x-stepup-level"] == "standard"
    assert h["x-stepup-issuer"] == sec_stack.idp_url
    assert h["x-stepup-amr"] == "pwd"  # the token's own amr, not the forged "hwk"
    assert h["x-stepup-decision-id"] != "forged"
    assert set(stepup) <= {
        "x-stepup-user",
        "x-stepup-acr",
        "x-stepup-level",
        "x-stepup-risk",
        "x-stepup-issuer",
        "x-stepup-auth-time",
        "x-stepup-decision-id",
        "x-stepup-amr",
    }


async def test_client_stepup_headers_do_not_satisfy_a_level(
    sec_stack: Stack,
    weak: list[tuple[str | bytes, str | bytes]],
    outcome: Callable[[str, str], None],
) -> None:
    r = await raw_request(sec_stack.listen_port, "GET", "/accounts/1", [*weak, *FORGED_STEPUP])
    outcome("401 acr-insufficient: identity only from the verified token", str(r))
    assert r.status == 401 and r.reason == "acr-insufficient"


async def test_underscore_header_names_refused(
    sec_stack: Stack,
    weak: list[tuple[str | bytes, str | bytes]],
    outcome: Callable[[str, str], None],
) -> None:
    """``x_stepup_user`` reaches CGI/WSGI upstreams as X-Stepup-User: Envoy refuses it."""
    r = await raw_request(sec_stack.listen_port, "GET", "/x", [*weak, ("x_stepup_user", "m")])
    outcome("400 (headers_with_underscores_action: REJECT_REQUEST)", str(r))
    assert r.status == 400


FORGED_ENVOY = [
    ("X-Envoy-Original-Path", "/public/x"),
    ("X-Envoy-Internal", "true"),
    ("X-Envoy-External-Address", "10.9.9.9"),
    ("X-Envoy-Retry-On", "5xx"),
    ("X-Envoy-Max-Retries", "100"),
    ("X-Envoy-Upstream-Rq-Timeout-Ms", "1"),
    ("X-Envoy-Decorator-Operation", "forged"),
    ("X-Envoy-Expected-Rq-Timeout-Ms", "1"),
    ("X-Envoy-Original-Url", "http://evil.example/"),
    ("X-Envoy-Hedge-On-Per-Try-Timeout", "true"),
    ("X-Request-Id", "client-chosen-id"),
]


async def test_client_envoy_headers_are_sanitised(
    sec_stack: Stack,
    weak: list[tuple[str | bytes, str | bytes]],
    outcome: Callable[[str, str], None],
) -> None:
    """Envoy at the edge (use_remote_address) drops client x-envoy-* control headers and
    regenerates x-request-id; the service decides the same with or without them."""
    port = sec_stack.listen_port
    denied = await raw_request(port, "GET", "/accounts/1", [*weak, *FORGED_ENVOY])
    r = await raw_request(port, "GET", "/x", [*weak, *FORGED_ENVOY])
    seen = r.echo()
    assert seen is not None, str(r)
    h = seen["headers"]
    forged = {k.lower() for k, _ in FORGED_ENVOY if k.lower() != "x-envoy-external-address"}
    leaked = sorted(
        k
        for k in forged
        if k in h and h[k] in dict((k2.lower(), v) for k2, v in FORGED_ENVOY).values()
    )
    outcome(
        "sensitive route still 401; upstream sees no client x-envoy-* value and an "
        "Envoy-made x-request-id",
        f"{denied}; leaked {leaked or 'none'}; x-envoy-external-address="
        f"{h.get('x-envoy-external-address')}",
    )
    assert denied.status == 401 and denied.reason == "acr-insufficient"
    assert not leaked
    assert h.get("x-envoy-external-address") == "127.0.0.1"  # Envoy's view, not ours


# -- non-UTF-8 ---------------------------------------------------------------------------------

NON_UTF8 = [
    pytest.param("/public/x", [("X-Junk", b"\xff\xfe\x80")], {"200"}, id="header-public"),
    pytest.param(
        "/accounts/1", [("X-Junk", b"\xff\xfe")], {"401 no-credentials"}, id="header-sensitive"
    ),
    pytest.param(
        "/accounts/1",
        [("Authorization", b"Bearer \xff\xfe")],
        {"401 token-invalid", "400"},
        id="authorization",
    ),
    pytest.param(
        "/accounts/1",
        [("Cookie", b"stepup-token=\xff\xfe")],
        {"401 token-invalid", "400"},
        id="cookie-token",
    ),
    pytest.param(
        "/accounts/1", [("Accept", b"text/html\xff")], {"302 no-credentials", "400"}, id="accept"
    ),
    pytest.param(
        "/ops/x", [("X-Forwarded-For", b"10.0.0.1\xff")], {"403 ip-not-allowed", "400"}, id="xff"
    ),
]


@pytest.mark.parametrize(("path", "extra", "expect"), NON_UTF8)
async def test_non_utf8(
    sec_stack: Stack,
    path: str,
    extra: list[tuple[str, bytes]],
    expect: set[str],
    outcome: Callable[[str, str], None],
) -> None:
    r = await raw_request(sec_stack.listen_port, "GET", path, list(extra))
    outcome(" or ".join(sorted(expect)) + "; no crash, no 200 on a sensitive route", str(r))
    assert _matches(r, expect), str(r)
    assert not (r.status == 200 and path.startswith("/accounts/"))


async def test_raw_non_ascii_path_refused(
    sec_stack: Stack, outcome: Callable[[str, str], None]
) -> None:
    r = await raw_request(sec_stack.listen_port, "GET", b"/accounts/\xff/../1", [])
    outcome("400 or 403 bad-path", str(r))
    assert r.status in (400, 403)


# -- request smuggling and framing ------------------------------------------------------------


async def _raw_wire(port: int, wire: bytes) -> list[bytes]:
    """Send exact bytes; return the raw answers (split on the status lines)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(wire)
        await writer.drain()
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65_536), 3.0):
                data += chunk
    finally:
        writer.close()
    return [b"HTTP/1.1" + part for part in data.split(b"HTTP/1.1")[1:]]


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


SMUGGLING = {
    "cl-and-te": (
        b"POST /public/x HTTP/1.1\r\nHost: app.example\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /accounts/1 HTTP/1.1\r\n"
        b"Host: app.example\r\n\r\n"
    ),
    "te-obfuscated": (
        b"POST /public/x HTTP/1.1\r\nHost: app.example\r\n"
        b"Transfer-Encoding: chunked, identity\r\nContent-Length: 4\r\n\r\n"
        b"0\r\n\r\nGET /accounts/1 HTTP/1.1\r\nHost: app.example\r\n\r\n"
    ),
    "te-with-space-before-colon": (
        b"POST /public/x HTTP/1.1\r\nHost: app.example\r\n"
        b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n"
        b"GET /accounts/1 HTTP/1.1\r\nHost: app.example\r\n\r\n"
    ),
    "two-content-lengths": (
        b"POST /public/x HTTP/1.1\r\nHost: app.example\r\n"
        b"Content-Length: 0\r\nContent-Length: 44\r\n\r\n"
        b"GET /accounts/1 HTTP/1.1\r\nHost: app.example\r\n\r\n"
    ),
    "pipelined-second-request-checked": (
        b"GET /public/x HTTP/1.1\r\nHost: app.example\r\n\r\n"
        b"GET /accounts/1 HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n"
    ),
    "bare-lf-line-endings": (
        b"GET /public/x HTTP/1.1\nHost: app.example\n\n"
        b"GET /accounts/1 HTTP/1.1\nHost: app.example\n\n"
    ),
    "http-1.0-no-host": b"GET /accounts/1 HTTP/1.0\r\n\r\n",
    "obs-fold-header": (
        b"GET /accounts/1 HTTP/1.1\r\nHost: app.example\r\nAuthorization: Bearer\r\n x.y.z\r\n\r\n"
    ),
}


@pytest.mark.parametrize("name", list(SMUGGLING))
async def test_smuggling(sec_stack: Stack, name: str, outcome: Callable[[str, str], None]) -> None:
    """No request hidden in another one's body or framing reaches /accounts/1 unchecked:
    Envoy refuses ambiguous framing, and every request it does forward gets its own Check
    (no credentials here, so /accounts/1 can only be 401/302/403/400)."""
    answers = await _raw_wire(sec_stack.listen_port, SMUGGLING[name])
    statuses = [_status(a) for a in answers]
    sensitive_ok = [a for a in answers if _status(a) == 200 and b'"/accounts/1"' in a]
    outcome(
        "Envoy refuses the framing (400/501) or each request is checked; no 200 for /accounts/1",
        f"statuses {statuses}",
    )
    assert not sensitive_ok
    assert statuses, "no answer at all"


# -- what the redirect reflects --------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "host"),
    [
        pytest.param({}, "evil.example", id="host-header"),
        pytest.param({"X-Forwarded-Host": "evil.example"}, "app.example", id="x-forwarded-host"),
        pytest.param({"X-Forwarded-Proto": "javascript"}, "app.example", id="x-forwarded-proto"),
        pytest.param({"X-Original-URL": "//evil.example/"}, "app.example", id="x-original-url"),
    ],
)
async def test_redirects_never_reflect_client_hosts(
    sec_stack: Stack, headers: dict[str, str], host: str, outcome: Callable[[str, str], None]
) -> None:
    r = await raw_request(
        sec_stack.listen_port,
        "GET",
        "/accounts/1",
        [("Accept", "text/html"), *headers.items()],
        host=host,
    )
    location = r.header("location") or ""
    outcome(
        "302 to a relative /_stepup/login link, not cacheable (404 for a host Envoy does not "
        "serve)",
        f"{r} -> {location}",
    )
    if host == "evil.example":  # not a served host: Envoy answers, nothing is reflected
        assert r.status == 404 and not location
        return
    assert r.status == 302 and location.startswith("/_stepup/login?rd=%2Faccounts%2F1")
    assert r.header("cache-control") == "no-store"


@pytest.mark.parametrize(
    ("path", "auth", "status"),
    [
        pytest.param("/accounts/1", False, 401, id="login-401"),
        pytest.param("/accounts/1", True, 401, id="step-up-401"),
        pytest.param("/ops/x", True, 403, id="deny-403"),
        pytest.param("/accounts;x/1", True, 403, id="bad-path-403"),
    ],
)
async def test_denials_are_not_cacheable(
    sec_stack: Stack,
    minter: Minter,
    path: str,
    auth: bool,
    status: int,
    outcome: Callable[[str, str], None],
) -> None:
    """A shared cache must never serve one user's denial (or challenge) to another."""
    h = [("Authorization", f"Bearer {minter.token(acr='pwd', amr=['pwd'])}")] if auth else []
    r = await raw_request(sec_stack.listen_port, "GET", path, h)
    outcome(f"{status} with Cache-Control: no-store", f"{r}; {r.header('cache-control')}")
    assert r.status == status and r.header("cache-control") == "no-store"
