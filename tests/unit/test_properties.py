"""Properties over generated inputs (hypothesis), in the normal test run and bounded.

* Any CheckRequest, through ``attributes_from_check`` and the ``Authorizer`` (in-memory
  store, a real ``TokenVerifier`` over a ``StaticKeySource``): the adapter raises only
  ``RequestError``, and the Authorizer always reaches a decision without an internal error.
* Adding noise headers never changes a decision (so never turns a deny into an allow).
* ``context_extensions`` never lower a level.
* ``canonicalize_path`` is idempotent and yields no ``..``, ``//`` or ``;``;
  ``normalize_host`` yields a plain host or refuses.
* Generated policies load or raise ``PolicyError``, never anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from authz.check.authorizer import Authorizer
from authz.check.request import PEER_HEADER, attributes_from_check
from authz.check.tokens import StaticKeySource, TokenVerifier
from authz.config.policy_file import PolicyHolder
from authz.config.settings import OidcSettings
from authz.core.attributes import (
    RequestAttributes,
    canonicalize_path,
    normalize_host,
)
from authz.core.decision import CONTEXT_LEVEL_KEY, Decision, Outcome, route_level
from authz.core.policy import Policy, load_policy
from authz.core.reasons import Reason
from authz.core.session import Evidence, Grant, session_key, user_key
from authz.errors import PolicyError, RequestError
from authz.ops.metrics import Metrics
from authz.store.memory import MemorySessionStore
from tests.builders import check_request, ec_key, jwks, sign, token_claims

BOUNDED = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NOW = 1_800_000_000
ISS = "https://idp.example.com"
AUD = "mesh"

POLICY_DOC: dict[str, Any] = {
    "levels": {
        "public": {"public": True},
        "standard": {},
        "elevated": {"acr": ["mfa", "phr"], "max_age": 900},
        "high": {"acr": ["phr"], "amr_any": ["hwk"], "max_age": 300, "bind": ["device", "ip"]},
        "ops": {"ip_allow": ["10.0.0.0/8"]},
    },
    "routes": [
        {"path": "/", "level": "public"},
        {"path_prefix": "/public/", "level": "public"},
        {"path_prefix": "/accounts/", "methods": ["GET", "HEAD"], "level": "elevated"},
        {"path_prefix": "/accounts/", "level": "high"},
        {"path_regex": "^/clients/[0-9]+/statements$", "level": "elevated"},
        {"host": "trading.example.com", "path_prefix": "/", "level": "elevated"},
        {"host": "*.ops.example.com", "level": "ops"},
        {"path_prefix": "/wires/", "methods": ["POST", "PUT"], "level": "high"},
    ],
    "default_level": "standard",
    "signals": {"sensitive_level": "elevated", "velocity": {"window_s": 60, "max": 1_000_000}},
    "rules": [
        {"name": "blocked", "when": {"ip_in": ["198.51.100.0/24"]}, "deny": "ip-blocked"},
        {
            "name": "outside",
            "when": {"ip_not_in": ["10.0.0.0/8", "127.0.0.0/8"], "level_at_least": "elevated"},
            "raise_to": "high",
        },
        {
            "name": "no-device",
            "when": {"device": "absent", "level_at_least": "high"},
            "raise_to": "high",
            "mode": "shadow",
        },
    ],
}
LEVELS = list(POLICY_DOC["levels"])

_KEY = ec_key("k1")


def _token(**over: Any) -> str:
    """alice's session s1, signed in with a password a minute ago; valid for an hour."""
    base = {"iss": ISS, "aud": AUD, "iat": NOW - 60, "exp": NOW + 3600, "auth_time": NOW - 60}
    return sign(_KEY, token_claims(NOW, **{**base, "acr": "pwd", "amr": ["pwd"], **over}))


TOKENS = {
    "none": None,
    "pwd": _token(),
    "mfa-fresh": _token(acr="mfa", amr=["pwd", "otp"], auth_time=NOW - 10),
    "mfa-stale": _token(acr="mfa", amr=["pwd", "otp"], auth_time=NOW - 1000),
    "phr-hwk": _token(acr="phr", amr=["hwk"], auth_time=NOW - 10),
    "expired": _token(exp=NOW - 3600),
    "other-aud": _token(aud="other"),
    "junk": "a.b.c",
}

_tmp = tempfile.TemporaryDirectory()
_POLICY_FILE = Path(_tmp.name) / "policy.yaml"
_POLICY_FILE.write_text(json.dumps(POLICY_DOC))  # JSON is YAML
HOLDER = PolicyHolder(_POLICY_FILE)
POLICY: Policy = HOLDER.current.policy
VERIFIER = TokenVerifier(
    OidcSettings(
        issuer=ISS, client_id="stepup-authz", audience=AUD, algorithms=("ES256",), leeway_s=30
    ),
    StaticKeySource(jwks(_KEY)),
)
METRICS = Metrics()


async def _fresh_authorizer() -> Authorizer:
    store = MemorySessionStore(now=lambda: NOW)
    # alice's session s1 holds a grant for elevated, as if she had stepped up earlier
    ev = Evidence("mfa", ("pwd", "otp"), NOW - 100)
    await store.write_grant(
        user_key(ISS, "alice"),
        session_key(ISS, "alice", "s1"),
        Grant("elevated", ev, NOW + 800, NOW - 100),
        NOW,
    )
    return Authorizer(
        policy=HOLDER,
        tokens=VERIFIER,
        store=store,
        metrics=METRICS,
        token_cookie="stepup_token",
        leeway=30,
        clock=lambda: NOW,
    )


def _run(coro: Any) -> Any:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def _decide(attrs: RequestAttributes) -> Decision:
    authz = await _fresh_authorizer()
    decision = (await authz.check(attrs)).decision
    await authz.drain()
    return decision


# -- strategies ----------------------------------------------------------------------------

_PATH_PIECES = st.sampled_from(
    [
        "",
        ".",
        "..",
        "%2e",
        "%2E%2e",
        ".%2e",
        "a",
        "A",
        "accounts",
        "ACCOUNTS",
        "public",
        "wires",
        "clients",
        "7",
        "statements",
        "%61",
        "%2f",
        "%2F",
        "%5c",
        "\\",
        ";",
        ";x",
        "..;",
        ".;",
        "%",
        "%4",
        "%zz",
        "%00",
        "%20",
        "~",
        "%7e",
        "é",
        " ",
        "\t",
        "?",
        "?x=../..",
        "#",
        "#/..",
        "a;b=c",
        "x%3By",
    ]
)
PATHS = st.lists(_PATH_PIECES, max_size=8).map(lambda xs: "/" + "/".join(xs)) | st.text(max_size=40)
METHODS = st.sampled_from(
    [
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "DELETE",
        "PATCH",
        "OPTIONS",
        "get",
        "PROPFIND",
        "",
        "G-T",
        "GET ",
        "CONNECT",
    ]
)
HOSTS = st.sampled_from(
    [
        "app.example",
        "trading.example.com",
        "TRADING.example.com.",
        "trading.example.com:443",
        "x.ops.example.com",
        "ops.example.com",
        "evil@trading.example.com",
        "a,b",
        "[::1]:8443",
        "",
        "trading.example.com:443:443",
        "host%2e",
        "h_o-s.t",
    ]
) | st.text(max_size=20)
IPS = st.sampled_from(
    ["127.0.0.1", "10.1.2.3", "198.51.100.7", "203.0.113.9", "::1", "::ffff:10.0.0.1", "", "junk"]
)
HEADER_NAMES = st.sampled_from(
    [
        "x-stepup-user",
        "x-stepup-level",
        "x-stepup-acr",
        "x-stepup-auth-time",
        "x-forwarded-for",
        "x-real-ip",
        "forwarded",
        "x-http-method-override",
        "x-envoy-internal",
        "x-envoy-original-path",
        "x-request-id",
        "accept",
        "content-type",
        "user-agent",
        "x-stepup-peer-address",
        "true-client-ip",
        "x-client-ip",
    ]
) | st.from_regex(r"x-[a-z0-9-]{1,20}", fullmatch=True)
HEADER_VALUES = st.text(max_size=40) | st.sampled_from(
    [
        "DELETE",
        "10.0.0.1",
        "198.51.100.7, 10.0.0.1",
        "phr",
        "high",
        "alice",
        "text/html",
        "application/grpc",
        "true",
        "/public/",
    ]
)
NOISE = st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=6)
CONTEXT = st.dictionaries(
    st.sampled_from([CONTEXT_LEVEL_KEY, "other", "stepup"]),
    st.sampled_from([*LEVELS, "HIGH", "", "unknown", "elevated "]),
    max_size=2,
)


@st.composite
def credentials(draw: st.DrawFn) -> dict[str, str]:
    token = TOKENS[draw(st.sampled_from(list(TOKENS)))]
    where = draw(st.sampled_from(["authorization", "cookie", "both-cookies", "none"]))
    if token is None or where == "none":
        return {}
    if where == "authorization":
        return {"authorization": f"Bearer {token}"}
    if where == "cookie":
        return {"cookie": f"theme=dark; stepup_token={token}"}
    return {"cookie": f"stepup_token={token}; stepup_token={TOKENS['pwd']}"}


@st.composite
def check_requests(draw: st.DrawFn) -> external_auth_pb2.CheckRequest:
    method, path, host = draw(METHODS), draw(PATHS), draw(HOSTS)
    scheme = draw(st.sampled_from(["http", "https", ""]))
    headers = {**draw(NOISE), **draw(credentials())}
    return check_request(
        path, headers, method=method, host=host, scheme=scheme, ip=draw(IPS), context=draw(CONTEXT)
    )


def _with(attrs: RequestAttributes, **changes: Any) -> RequestAttributes:
    fields = {f: getattr(attrs, f) for f in RequestAttributes.__slots__}
    fields.update(changes)
    return RequestAttributes(**fields)


# -- the Check path ------------------------------------------------------------------------


@BOUNDED
@given(check_requests(), st.sampled_from([PEER_HEADER, None]))
def test_any_check_request_gets_a_decision(
    req: external_auth_pb2.CheckRequest, peer_header: str | None
) -> None:
    try:
        attrs = attributes_from_check(req, peer_header)
    except RequestError as exc:
        assert exc.reason in (Reason.BAD_PATH, Reason.BAD_REQUEST, Reason.METHOD_NOT_CANONICAL)
        return
    decision = _run(_decide(attrs))
    assert isinstance(decision, Decision)
    assert decision.reason != Reason.INTERNAL_ERROR, "an exception escaped inside the Check"
    if decision.outcome is Outcome.ALLOW and decision.level is not None:
        assert decision.level.public or decision.identity is not None


@BOUNDED
@given(st.binary(max_size=512))
def test_any_bytes_parse_or_are_refused(raw: bytes) -> None:
    req = external_auth_pb2.CheckRequest()
    try:
        req.ParseFromString(raw)
    except DecodeError:
        return
    with contextlib.suppress(RequestError):
        attributes_from_check(req)


@BOUNDED
@given(check_requests(), NOISE)
def test_noise_headers_never_change_the_decision(
    req: external_auth_pb2.CheckRequest, noise: dict[str, str]
) -> None:
    try:
        attrs = attributes_from_check(req)
    except RequestError:
        return
    noisy = _with(attrs, headers=MappingProxyType({**noise, **attrs.headers}))
    before = _run(_decide(attrs))
    after = _run(_decide(noisy))
    assert not (before.outcome is not Outcome.ALLOW and after.outcome is Outcome.ALLOW)
    assert (before.outcome, before.reason) == (after.outcome, after.reason)


@BOUNDED
@given(check_requests(), CONTEXT)
def test_context_extensions_never_lower_a_level(
    req: external_auth_pb2.CheckRequest, ctx: dict[str, str]
) -> None:
    try:
        attrs = attributes_from_check(req)
    except RequestError:
        return
    plain = _with(attrs, context_extensions=MappingProxyType({}))
    raised = _with(attrs, context_extensions=MappingProxyType(ctx))
    base, with_ctx = route_level(POLICY, plain), route_level(POLICY, raised)
    assert base.level is not None
    if with_ctx.deny is None:
        assert with_ctx.level is not None and with_ctx.level.rank >= base.level.rank
    else:
        assert with_ctx.deny == Reason.UNKNOWN_LEVEL
    # And end to end: what is not allowed without the extension is not allowed with it.
    d_plain, d_raised = _run(_decide(plain)), _run(_decide(raised))
    if d_plain.outcome is not Outcome.ALLOW:
        assert d_raised.outcome is not Outcome.ALLOW


# -- canonical forms -----------------------------------------------------------------------


@BOUNDED
@given(PATHS)
def test_canonical_path_is_idempotent_and_clean(raw: str) -> None:
    try:
        path, _query = canonicalize_path(raw)
    except RequestError:
        return
    assert path.startswith("/")
    assert "//" not in path
    segments = path.split("/")
    assert ".." not in segments and "." not in segments
    assert ";" not in path and "\\" not in path
    assert canonicalize_path(path) == (path, "")


@BOUNDED
@given(HOSTS)
def test_host_is_plain_or_refused(authority: str) -> None:
    try:
        host = normalize_host(authority)
    except RequestError:
        return
    assert host == host.strip().lower()
    assert not any(c in host for c in "@,;%/ \t")
    assert not host.endswith(".") or host.startswith("[")
    if host:
        assert normalize_host(host) == host


# -- policies ------------------------------------------------------------------------------

_JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 100_000)
    | st.text(max_size=12)
    | st.sampled_from(
        [
            *LEVELS,
            "mfa",
            "/x/",
            "10.0.0.0/8",
            "device",
            "ip",
            "GET",
            "US",
            "new-device",
            "known",
            "enforce",
            "shadow",
            "(",
            "^/a$",
        ]
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_LEVEL_SPEC = st.fixed_dictionaries(
    {},
    optional={
        k: _JSONISH
        for k in (
            "acr",
            "amr_any",
            "max_age",
            "public",
            "grant_ttl",
            "bind",
            "ip_allow",
            "ip_deny",
            "junk",
        )
    },
)
_ROUTE = st.fixed_dictionaries(
    {},
    optional={
        k: _JSONISH for k in ("host", "path", "path_prefix", "path_regex", "methods", "level")
    },
)
_RULE = st.fixed_dictionaries(
    {},
    optional={
        "name": _JSONISH,
        "raise_to": _JSONISH,
        "deny": _JSONISH,
        "mode": _JSONISH,
        "when": st.fixed_dictionaries(
            {},
            optional={
                k: _JSONISH
                for k in (
                    "ip_in",
                    "ip_not_in",
                    "country_in",
                    "country_not_in",
                    "device",
                    "signals_any",
                    "signals_all",
                    "level_at_least",
                )
            },
        )
        | _JSONISH,
    },
)
_SIGNALS = st.fixed_dictionaries(
    {},
    optional={
        "sensitive_level": _JSONISH,
        "velocity": _JSONISH,
        "impossible_travel": _JSONISH,
        "risk_weights": _JSONISH,
        "hours": st.fixed_dictionaries(
            {}, optional={k: _JSONISH for k in ("timezone", "start", "end", "days")}
        )
        | _JSONISH,
    },
)
POLICIES = (
    st.fixed_dictionaries(
        {},
        optional={
            "levels": st.dictionaries(
                st.sampled_from(LEVELS) | st.text(max_size=6), _LEVEL_SPEC, max_size=4
            )
            | _JSONISH,
            "routes": st.lists(_ROUTE, max_size=4) | _JSONISH,
            "rules": st.lists(_RULE, max_size=3) | _JSONISH,
            "default_level": _JSONISH,
            "signals": _SIGNALS | _JSONISH,
            "version": _JSONISH,
        },
    )
    | _JSONISH
)


@BOUNDED
@given(POLICIES)
# Found by this property (TypeError, not PolicyError, before the fix): unhashable items.
@example({"levels": [[]]})
@example({"levels": {"a": {"bind": [{}]}}, "default_level": "a"})
@example(
    {"levels": {"a": {}}, "default_level": "a", "rules": [{"when": {"device": [[]]}, "deny": "x"}]}
)
@example(
    {
        "levels": {"a": {}},
        "default_level": "a",
        "signals": {"hours": {"timezone": "UTC", "start": "07:00", "end": "19:00", "days": [{}]}},
    }
)
def test_generated_policies_load_or_raise_policy_error(doc: Any) -> None:
    try:
        policy = load_policy(doc)
    except PolicyError:
        return
    assert policy.levels and policy.default_level in policy.levels
    for route in policy.routes:
        assert route.level in policy.levels


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(LEVELS), min_size=1, max_size=5, unique=True),
    st.lists(st.tuples(st.sampled_from(["/a/", "/b/", "/"]), st.integers(0, 4)), max_size=4),
)
def test_valid_policies_route_every_request(
    names: list[str], routes: list[tuple[str, int]]
) -> None:
    """Random but valid level/route tables always give every request some level."""
    levels: dict[str, Mapping[str, Any]] = {n: {} for n in names}
    doc = {
        "levels": levels,
        "default_level": names[0],
        "routes": [{"path_prefix": p, "level": names[i % len(names)]} for p, i in routes],
    }
    policy = load_policy(doc)
    attrs = RequestAttributes(
        "GET", "https", "h", "/a/x", "", MappingProxyType({}), ipaddress.ip_address("10.0.0.1")
    )
    assert route_level(policy, attrs).level is not None
