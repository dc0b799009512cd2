"""The route and rule indexes decide exactly what the linear scans decide.

``Policy.route_for`` (the index) against ``Policy.route_for_scan`` (every route in file
order), and ``resolve_level`` with the rule index against the same with every rule, on
random policies and requests drawn from small alphabets so that hosts, prefixes, exact
paths, regexes, methods and networks collide often.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.core import policy_index
from authz.core.attributes import RequestAttributes
from authz.core.decision import resolve_level
from authz.core.policy import DEVICE_STATES, Context, Policy, Rule, load_policy

LEVELS = {"public": {"public": True}, "standard": {}, "elevated": {}, "high": {}}
LEVEL_NAMES = list(LEVELS)

# -- routes ----------------------------------------------------------------------------------

SEGMENTS = ["a", "b", "ab", "1", "12", ""]
ROUTE_HOSTS = [None, "a.test", "b.a.test", "*.a.test", "*.test", "A.Test", "a.test."]
PATHS = ["/", "/a", "/a/", "/a/b", "/ab", "/a/b/", "/b/1", "/a/12", "/ab/"]
REGEXES = [
    "^/a/[0-9]+$",
    "/a.*",
    "^/(a|b)/?$",
    "/[ab]+",
    ".*",
    "/a/b",
    "^/b/[0-9]{1,2}$",
    "/(a+)+$",
]
METHOD_SETS = [None, ["GET"], ["HEAD"], ["POST"], ["GET", "POST"], ["PUT", "DELETE"]]
REQUEST_HOSTS = [
    "a.test",
    "b.a.test",
    "x.b.a.test",
    "test",
    ".a.test",
    "A.TEST",
    "a.test.",
    "xa.test",
    "other",
]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"]


@st.composite
def route_docs(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {"level": draw(st.sampled_from(LEVEL_NAMES))}
    host = draw(st.sampled_from(ROUTE_HOSTS))
    if host is not None:
        doc["host"] = host
    kind = draw(st.sampled_from(["path", "path_prefix", "path_regex", None]))
    if kind == "path_regex":
        doc[kind] = draw(st.sampled_from(REGEXES))
    elif kind is not None:
        doc[kind] = draw(st.sampled_from(PATHS) | segment_paths(min_size=1))
    methods = draw(st.sampled_from(METHOD_SETS))
    if methods is not None:
        doc["methods"] = methods
    return doc


def segment_paths(min_size: int = 0) -> st.SearchStrategy[str]:
    segments = st.lists(st.sampled_from(SEGMENTS), min_size=min_size, max_size=4)
    return segments.map(lambda s: "/" + "/".join(s))


def request_paths() -> st.SearchStrategy[str]:
    return (
        st.sampled_from(PATHS)
        | segment_paths()
        | st.text(alphabet="/ab12.", max_size=10)
        | st.just("")
    )


def _policy(routes: list[dict[str, Any]], rules: list[dict[str, Any]] | None = None) -> Policy:
    return load_policy(
        {"levels": LEVELS, "routes": routes, "rules": rules or [], "default_level": "standard"}
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    routes=st.lists(route_docs(), max_size=25),
    requests=st.lists(
        st.tuples(st.sampled_from(REQUEST_HOSTS), st.sampled_from(METHODS), request_paths()),
        min_size=1,
        max_size=20,
    ),
)
def test_the_route_index_finds_what_the_scan_finds(
    routes: list[dict[str, Any]], requests: list[tuple[str, str, str]]
) -> None:
    policy = _policy(routes)
    for host, method, path in requests:
        assert policy.route_for(host, method, path) is policy.route_for_scan(host, method, path)


@settings(max_examples=300, deadline=None)
@given(
    route=route_docs(),
    requests=st.lists(
        st.tuples(st.sampled_from(REQUEST_HOSTS), st.sampled_from(METHODS), request_paths()),
        min_size=1,
        max_size=30,
    ),
)
def test_each_route_alone_is_found_where_the_scan_finds_it(
    route: dict[str, Any], requests: list[tuple[str, str, str]]
) -> None:
    """One route per policy: no earlier route (a ``/`` prefix, ``.*``) hides a request the
    index would miss."""
    policy = _policy([route])
    for host, method, path in requests:
        assert policy.route_for(host, method, path) is policy.route_for_scan(host, method, path)


def test_every_kind_of_route_is_found_where_the_scan_finds_it() -> None:
    """Spelled out: each index structure answers, and file order wins across them."""
    policy = _policy(
        [
            {"host": "*.a.test", "path": "/x", "level": "high"},  # 0
            {"path_regex": "^/x$", "level": "elevated"},  # 1
            {"path_prefix": "/x/", "methods": ["GET"], "level": "elevated"},  # 2
            {"host": "a.test", "path_prefix": "/", "level": "public"},  # 3
            {"path_prefix": "/x/", "level": "high"},  # 4
            {"path_regex": "^/y/[0-9]+$", "level": "high"},  # 5
            {"host": "b.test", "level": "public"},  # 6: any path
        ]
    )
    cases = [
        ("b.a.test", "GET", "/x", 0),  # the wildcard's exact path, before the regex
        (".a.test", "GET", "/x", 0),  # endswith, as Route.matches reads it
        ("a.test", "GET", "/x", 1),  # no wildcard for the bare name: the regex
        ("a.test", "HEAD", "/x/1", 2),  # GET brings HEAD
        ("a.test", "POST", "/x/1", 3),  # the method filter skips 2
        ("c.test", "POST", "/x", 1),
        ("c.test", "POST", "/x/", 4),
        ("c.test", "DELETE", "/x/", 4),
        ("c.test", "GET", "/y/12", 5),
        ("c.test", "GET", "/y/12/", None),
        ("b.test", "GET", "/anything", 6),
        ("A.TEST", "GET", "/z", None),  # the host as given, as Route.matches compares it
    ]
    for host, method, path, want in cases:
        found = policy.route_for(host, method, path)
        assert (found.index if found else None) == want, (host, method, path)
        assert found is policy.route_for_scan(host, method, path)


def test_regexes_are_one_set_and_only_candidates_are_confirmed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    routes = [{"path_regex": f"^/svc{i}/items/[0-9]+$", "level": "high"} for i in range(300)]
    policy = _policy(routes)
    tried: list[int] = []
    real = policy_index._first_of

    def spy(candidates: Any, *args: Any) -> Any:
        candidates = list(candidates)
        tried.extend(r.index for r in candidates)
        return real(candidates, *args)

    monkeypatch.setattr(policy_index, "_first_of", spy)
    found = policy.route_for("h", "GET", "/svc299/items/7")
    assert found is not None and found.index == 299
    assert tried == [299]  # not 300 regex matches: the set named the one candidate


def test_a_regex_set_that_cannot_be_used_falls_back_to_each_regex_in_order() -> None:
    """A set RE2 refuses to build (``_match`` unset) answers "every regex route", never
    "none": the routes' own regexes then decide, in file order."""
    routes = [
        {"path_regex": "^/a/[0-9]+$", "level": "elevated"},
        {"path_regex": "^/a/.*$", "level": "high"},
    ]
    policy = _policy(routes)
    group = policy.route_index._any  # type: ignore[attr-defined]
    group._regex._match = None
    assert list(group._regex.candidates("/nothing")) == list(policy.routes)
    for path in ("/a/1", "/a/x", "/b"):
        assert policy.route_for("h", "GET", path) is policy.route_for_scan("h", "GET", path)


# -- rules -----------------------------------------------------------------------------------

NETWORKS = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.3/32",
    "192.0.2.0/24",
    "0.0.0.0/0",
    "2001:db8::/32",
    "::/0",
    "::ffff:0:0/96",
]
ADDRESSES = [
    None,
    "10.1.2.3",
    "10.1.9.9",
    "10.9.9.9",
    "192.0.2.7",
    "8.8.8.8",
    "2001:db8::1",
    "::1",
    "::ffff:10.1.2.3",
]
COUNTRIES = ["US", "KP", "IR"]
SOME_SIGNALS = ["new-device", "velocity", "impossible-travel", "off-hours"]


def _subset(items: list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(items), min_size=1, max_size=3, unique=True)


@st.composite
def rule_docs(draw: st.DrawFn) -> dict[str, Any]:
    conditions: dict[str, st.SearchStrategy[Any]] = {
        "ip_in": _subset(NETWORKS),
        "ip_not_in": _subset(NETWORKS),
        "country_in": _subset(COUNTRIES),
        "country_not_in": _subset(COUNTRIES),
        "device": _subset(sorted(DEVICE_STATES)),
        "signals_any": _subset(SOME_SIGNALS),
        "signals_all": _subset(SOME_SIGNALS),
        "level_at_least": st.sampled_from(LEVEL_NAMES),
    }
    keys = draw(st.lists(st.sampled_from(sorted(conditions)), min_size=1, max_size=3, unique=True))
    doc: dict[str, Any] = {"when": {k: draw(conditions[k]) for k in keys}}
    if draw(st.booleans()):
        doc["deny"] = "blocked"
    else:
        doc["raise_to"] = draw(st.sampled_from(LEVEL_NAMES))
    if draw(st.integers(0, 4)) == 0:
        doc["mode"] = "shadow"
    return doc


@st.composite
def contexts(draw: st.DrawFn) -> Context | None:
    if draw(st.integers(0, 5)) == 0:
        return None
    return Context(
        device=frozenset(draw(st.lists(st.sampled_from(sorted(DEVICE_STATES)), max_size=3))),
        country=draw(st.sampled_from([None, *COUNTRIES, "FR"])),
        signals=frozenset(draw(st.lists(st.sampled_from(SOME_SIGNALS), max_size=3))),
    )


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    return None if text is None else ipaddress.ip_address(text)


def _every_rule(self: Policy, ip: Any, ctx: Any = None) -> Sequence[Rule]:
    return self.rules


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rules=st.lists(rule_docs(), max_size=20),
    requests=st.lists(
        st.tuples(
            st.sampled_from(ADDRESSES),
            contexts(),
            st.sampled_from(["/", "/x", "/hi/1"]),
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_the_rule_index_decides_what_every_rule_decides(
    rules: list[dict[str, Any]], requests: list[tuple[str | None, Context | None, str]]
) -> None:
    routes = [
        {"path": "/", "level": "public"},
        {"path_prefix": "/hi/", "level": "elevated"},
    ]
    policy = _policy(routes, rules)
    for address, ctx, path in requests:
        ip = _ip(address)
        candidates = list(policy.rules_for(ip, ctx))
        # file order, no repeats, and no rule that could match at some level left out
        assert [r.index for r in candidates] == sorted({r.index for r in candidates})
        for rule in policy.rules:
            if any(rule.matches(ip, ctx, level) for level in (None, *policy.levels)):
                assert rule in candidates, (rule, address, ctx)
        attrs = RequestAttributes(
            method="GET",
            scheme="https",
            host="app.test",
            path=path,
            query="",
            headers={},
            source_ip=ip,
        )
        indexed = resolve_level(policy, attrs, ctx)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Policy, "rules_for", _every_rule)
            scanned = resolve_level(policy, attrs, ctx)
        assert indexed == scanned


def test_the_index_leaves_out_rules_that_cannot_fire() -> None:
    """The growth benchmark's shape: 100 rules of every kind, none fires for a request from
    127.0.0.1 with no device or GeoIP -- and none of them is even tried."""
    from bench.growth import many_rules

    policy = _policy([], many_rules(100))
    ctx = Context()
    assert list(policy.rules_for(ipaddress.ip_address("127.0.0.1"), ctx)) == []
    excluded_elsewhere = {r.name for r in policy.rules if r.ip_not_in}  # 127/8 and 10/8
    found = {r.name for r in policy.rules_for(ipaddress.ip_address("198.18.6.9"), ctx)}
    assert found == {"growth-6"} | excluded_elsewhere  # growth-6: ip_in 198.18.6.0/24
    # an unknown address is never in ip_in and never excluded by ip_not_in
    assert {r.name for r in policy.rules_for(None, ctx)} == {
        r.name for r in policy.rules if r.ip_not_in and not r.ip_in
    }
