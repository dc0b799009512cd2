"""Route matching as users expect and as Envoy does it: GET brings HEAD, methods are
case-sensitive, ``/wires/`` covers ``/wires``, regexes are RE2 (linear, Envoy's dialect),
and a key given twice in any file the service or its CLI reads is refused.

The same cases through real Envoy: tests/e2e/test_route_matching_e2e.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from authz.audit.config import load_exporter_settings
from authz.check.request import PEER_HEADER, attributes_from_check, attributes_from_http
from authz.config.explain_request import load_request
from authz.config.policy_file import parse_policy_text
from authz.core.policy import MAX_REGEX_PROGRAM_SIZE, PathRegex, load_policy
from authz.core.reasons import Reason
from authz.devidp.config import load_file
from authz.errors import ConfigError, PolicyError, RequestError
from authz.render import render_envoy
from authz.render.istio import render_istio
from tests.builders import check_request

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "authz.cli"]

POLICY = """\
levels:
  standard: {}
  elevated: {acr: [mfa], max_age: 900}
  high: {acr: [mfa], max_age: 300}
routes:
  - {path_prefix: /accounts/, methods: [GET], level: elevated}
  - {path_prefix: /accounts/, level: high}
  - {path_prefix: /wires/, level: high}
  - {path_regex: '^/clients/[0-9]+/statements$', level: elevated}
default_level: standard
"""


def _policy(text: str = POLICY):  # type: ignore[no-untyped-def]
    return parse_policy_text(text, "policy.yaml").policy


def _level(method: str, path: str, text: str = POLICY) -> str:
    p = _policy(text)
    route = p.route_for("app.test", method, path)
    return (route.level if route else p.default_level).name


# -- methods -------------------------------------------------------------------------------


def test_get_route_covers_head() -> None:
    assert _level("GET", "/accounts/1") == "elevated"
    assert _level("HEAD", "/accounts/1") == "elevated"  # RFC 9110 section 9.3.2
    assert _level("POST", "/accounts/1") == "high"
    (route, *_) = _policy().routes
    assert route.methods == frozenset({"GET", "HEAD"})


def test_head_only_route_does_not_bring_get() -> None:
    text = POLICY.replace("methods: [GET]", "methods: [HEAD]")
    assert _level("HEAD", "/accounts/1", text) == "elevated"
    assert _level("GET", "/accounts/1", text) == "high"


def test_rendered_envoy_and_istio_match_head_on_get_routes() -> None:
    policy = _policy()
    doc = render_envoy(policy, hosts=["app.test"])
    listener = doc["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (get_route,) = [r for r in routes if r["name"] == "policy-0-elevated"]
    assert get_route["match"]["headers"] == [
        {"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}}
    ]
    istio = render_istio(policy, namespace="app")
    (elevated,) = [d for d in istio if d["metadata"]["name"] == "stepup-elevated"]
    ops = [r["to"][0]["operation"] for r in elevated["spec"]["rules"]]
    assert ops[0]["methods"] == ["GET", "HEAD"]


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("[get]", "methods are case-sensitive: write 'GET', not 'get'"),
        ("[GET, Post]", "methods are case-sensitive: write 'POST', not 'Post'"),
        ("[FETCH]", "unknown method 'FETCH'"),
    ],
)
def test_policy_refuses_non_canonical_methods_with_the_line(written: str, message: str) -> None:
    text = POLICY.replace("methods: [GET]", f"methods: {written}")
    with pytest.raises(PolicyError) as err:
        parse_policy_text(text, "policy.yaml")
    assert str(err.value).startswith("policy.yaml:line 6, column ")
    assert "(routes.0.methods." in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize("method", ["post", "Post", "get", "gET"])
def test_a_lower_case_method_is_refused_in_both_modes(method: str) -> None:
    with pytest.raises(RequestError) as err:
        attributes_from_check(check_request("/wires/1", method=method))
    assert err.value.reason is Reason.METHOD_NOT_CANONICAL
    headers = {"host": "app.test", PEER_HEADER: "10.0.0.1"}
    with pytest.raises(RequestError) as err:
        attributes_from_http(method, "/check/wires/1", headers, path_prefix="/check")
    assert err.value.reason is Reason.METHOD_NOT_CANONICAL


def test_canonical_methods_are_kept_as_sent() -> None:
    assert attributes_from_check(check_request("/x", method="PROPFIND")).method == "PROPFIND"
    headers = {"host": "app.test", PEER_HEADER: "10.0.0.1"}
    assert attributes_from_http("POST", "/check/x", headers, path_prefix="/check").method == "POST"


def test_explain_refuses_a_lower_case_method(tmp_path: Path) -> None:
    req = tmp_path / "req.json"
    req.write_text('{\n  "method": "post",\n  "path": "/wires/1"\n}\n')
    with pytest.raises(ConfigError) as err:
        load_request(req)
    assert "line 2" in str(err.value) and "write 'POST', not 'post'" in str(err.value)


# -- prefixes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "level"),
    [
        ("/wires/", "high"),
        ("/wires/1", "high"),
        ("/wires", "high"),  # the bare segment
        ("/wiresx", "standard"),  # not another segment that starts the same
        ("/wire", "standard"),
    ],
)
def test_a_slash_prefix_covers_its_bare_segment(path: str, level: str) -> None:
    assert _level("POST", path) == level


def test_root_and_slashless_prefixes_are_plain_prefixes() -> None:
    text = POLICY.replace("path_prefix: /wires/", "path_prefix: /wires")
    assert _level("POST", "/wiresx", text) == "high"  # as written: a string prefix
    p = load_policy({"levels": {"standard": {}}, "routes": [], "default_level": "standard"})
    assert p.route_for("a", "GET", "") is None


def test_rendered_envoy_covers_the_bare_segment_too() -> None:
    doc = render_envoy(_policy(), hosts=["app.test"])
    listener = doc["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (wires,) = [r for r in routes if r["name"] == "policy-2-high"]
    assert wires["match"] == {"path_separated_prefix": "/wires"}


# -- regexes -------------------------------------------------------------------------------


def test_route_regexes_are_re2() -> None:
    route = _policy().routes[3]
    assert isinstance(route.regex, PathRegex)
    assert route.regex.pattern == "^/clients/[0-9]+/statements$"
    assert _level("GET", "/clients/42/statements") == "elevated"
    assert _level("GET", "/clients/42/statements/x") == "standard"  # a full match


def test_a_catastrophic_pattern_is_linear() -> None:
    """``(a+)+$`` takes Python's ``re`` seconds on 32 characters and doubles with each one
    more; RE2 answers at once even for 100 000 (the test's timeout is the fence)."""
    text = POLICY.replace("'^/clients/[0-9]+/statements$'", "'/(a+)+$'")
    for n in (31, 100_000):
        assert _level("GET", "/" + "a" * n + "!", text) == "standard"
    assert _level("GET", "/" + "a" * 31, text) == "elevated"


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("^/a(?=b)", "invalid perl operator: (?="),  # lookahead
        ("^/a(?!b)", "invalid perl operator: (?!"),
        ("^/(?<=a)b", "invalid perl operator: (?<"),  # lookbehind
        (r"^/(a+)\\1$", "invalid escape sequence: \\1"),  # a backreference
        ("^/[a-", "missing ]"),
    ],
)
def test_patterns_re2_refuses_are_refused_with_line_and_pattern(pattern: str, why: str) -> None:
    text = POLICY.replace("'^/clients/[0-9]+/statements$'", f'"{pattern}"')
    with pytest.raises(PolicyError) as err:
        parse_policy_text(text, "policy.yaml")
    msg = str(err.value)
    assert msg.startswith("policy.yaml:line 9, column ") and "(routes.3.path_regex)" in msg
    assert f"not an RE2 regular expression ({why}" in msg
    assert repr(pattern.replace("\\\\", "\\")) in msg


def test_a_pattern_too_large_for_envoy_is_refused() -> None:
    # Envoy refuses an RE2 program larger than 100 (tests/e2e checks the bound with Envoy).
    text = POLICY.replace("'^/clients/[0-9]+/statements$'", "'^/(a{1,10}){1,10}$'")
    with pytest.raises(PolicyError, match=r"too large for Envoy \(RE2 program size 223 > 100\)"):
        parse_policy_text(text, "policy.yaml")
    assert MAX_REGEX_PROGRAM_SIZE == 100


def test_policy_check_cli_refuses_a_lookahead_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text(POLICY.replace("'^/clients/[0-9]+/statements$'", "'^/clients/(?!0)[0-9]+$'"))
    r = subprocess.run([*CLI, "policy", "check", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert f"{bad}:line 9, column " in r.stderr
    assert "not an RE2 regular expression (invalid perl operator: (?!)" in r.stderr
    assert "'^/clients/(?!0)[0-9]+$'" in r.stderr


# -- repeated keys -------------------------------------------------------------------------


def test_policy_check_cli_refuses_a_repeated_key(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text(POLICY + "default_level: high\n")
    r = subprocess.run([*CLI, "policy", "check", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert (
        f"{bad}:line 11, column 1: duplicate key 'default_level' (first given at line 10)"
        in r.stderr
    )


def test_explain_request_refuses_a_repeated_key_with_its_line(tmp_path: Path) -> None:
    req = tmp_path / "req.json"
    req.write_text('{\n  "method": "GET",\n  "path": "/public/x",\n  "path": "/wires/1"\n}\n')
    with pytest.raises(ConfigError) as err:
        load_request(req)
    assert str(err.value) == (
        f"{req}:line 4, column 3: duplicate key 'path' (first given at line 3)"
    )


def test_explain_cli_refuses_a_repeated_key(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"path": "/public/x"})[:-1] + ', "path": "/wires/1"}')
    r = subprocess.run(
        [*CLI, "policy", "explain", str(policy), "--request", str(req)],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "duplicate key 'path'" in r.stderr and r.stdout == ""


def test_exporter_settings_refuse_a_repeated_key(tmp_path: Path) -> None:
    cfg = tmp_path / "exporter.yaml"
    cfg.write_text("archive_dir: /a\narchive_dir: /b\n")
    with pytest.raises(ConfigError) as err:
        load_exporter_settings(cfg)
    assert str(err.value) == (
        f"{cfg}:line 2, column 1: duplicate key 'archive_dir' (first given at line 1)"
    )


def test_devidp_users_file_refuses_a_repeated_user(tmp_path: Path) -> None:
    f = tmp_path / "users.yaml"
    f.write_text(
        "users:\n"
        "  carol: {password: a, totp_secret: JBSWY3DPEHPK3PXP}\n"
        "  carol: {password: b, totp_secret: JBSWY3DPEHPK3PXP}\n"
    )
    with pytest.raises(ConfigError, match=r"line 3, column 3: duplicate key 'carol'"):
        load_file(f)
