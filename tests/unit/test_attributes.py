"""Canonical paths, hosts, IPs and cookies as the policy sees them."""

from __future__ import annotations

import pytest

from authz.core.attributes import (
    canonicalize_path,
    cookie_values,
    normalize_host,
    parse_ip,
)
from authz.errors import RequestError


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        ("/accounts/123", "/accounts/123", ""),
        ("/accounts/123?x=1&y=2", "/accounts/123", "x=1&y=2"),
        ("//accounts///123", "/accounts/123", ""),
        ("/public/../accounts/1", "/accounts/1", ""),
        ("/./accounts/./1", "/accounts/1", ""),
        ("/a/b/../../../accounts/1", "/accounts/1", ""),
        ("/%61ccounts/1", "/accounts/1", ""),  # unreserved percent-decoded
        ("/accounts/%7e", "/accounts/~", ""),
        ("/a%20b", "/a%20b", ""),  # reserved stays encoded, upper-cased
        ("/a%2a", "/a%2A", ""),
        ("/accounts/", "/accounts/", ""),
        ("/accounts/1/.", "/accounts/1/", ""),
        ("/accounts#frag", "/accounts", ""),
        ("/", "/", ""),
        ("/..", "/", ""),
    ],
)
def test_canonical_paths(raw: str, path: str, query: str) -> None:
    assert canonicalize_path(raw) == (path, query)


@pytest.mark.parametrize(
    "raw",
    [
        "accounts/1",  # not absolute
        "/accounts%2F1",  # encoded slash
        "/accounts%2f1",
        "/accounts%5C1",  # encoded backslash
        "/accounts\\1",  # raw backslash
        "/a/..;/accounts",  # servlet path-parameter trick
        "/a%zz",  # bad percent-encoding
        "/a%2",
        "/a\tb",  # control character
        "/a%00b",  # encoded NUL
        "/caf\u00e9",  # non-ASCII
        "/a b",
    ],
)
def test_paths_refused(raw: str) -> None:
    with pytest.raises(RequestError) as info:
        canonicalize_path(raw)
    assert info.value.reason == "bad-path"


@pytest.mark.parametrize(
    ("authority", "host"),
    [
        ("Trading.Example.COM", "trading.example.com"),
        ("trading.example.com.", "trading.example.com"),
        ("trading.example.com:443", "trading.example.com"),
        ("trading.example.com.:8443", "trading.example.com"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
    ],
)
def test_hosts(authority: str, host: str) -> None:
    assert normalize_host(authority) == host


def test_ipv4_mapped_addresses_are_ipv4() -> None:
    assert str(parse_ip("::ffff:10.1.2.3")) == "10.1.2.3"
    assert str(parse_ip("2001:db8::1")) == "2001:db8::1"
    assert parse_ip("not-an-ip") is None


def test_cookie_values_finds_every_copy() -> None:
    header = 'a=1; stepup_token=abc; b="2"; stepup_token=def'
    assert cookie_values(header, "stepup_token") == ["abc", "def"]
    assert cookie_values(header, "b") == ["2"]
    assert cookie_values(header, "missing") == []
