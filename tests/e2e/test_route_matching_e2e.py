"""Route matching through the real Envoy that ``render envoy`` configures, in both ext_authz
modes: HEAD on a GET route, the bare ``/wires``, a lower-case ``:method`` over HTTP/2, a
backtracking-hostile regex, Envoy's own RE2 limits, and a policy with a repeated key.

The attacker's story (docs/threat-model.md, "Route matching"): the attacker holds a
password-only token and wants a response from a route that needs a second factor, by
sending the request in a shape the policy's author did not write down -- HEAD instead of
GET, ``/wires`` instead of ``/wires/``, ``post`` instead of ``POST`` -- or wants to stall
the service with a path built against a regex. Each is judged like the request it stands
for or refused, and the upstream's request counter shows nothing got through.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
import yaml

from authz.core.policy import load_policy
from authz.demo.stack import Stack
from authz.render import render_envoy
from tests.builders import wait_until

from .test_foreign_hosts import _counters, _http1
from .test_lifecycle import metric
from .test_stepup_flow import password_token

pytestmark = pytest.mark.e2e

HOST = "app.example.com"
POLICY = """\
version: matching-1
levels:
  public:   {public: true}
  standard: {}
  elevated: {acr: [mfa, phr], max_age: 900}
  high:     {acr: [mfa, phr], max_age: 300}
routes:
  - {host: app.example.com, path_prefix: /public/, level: public}
  - {host: app.example.com, path_prefix: /accounts/, methods: [GET], level: elevated}
  - {host: app.example.com, path: /transfer, methods: [POST], level: high}
  - {host: app.example.com, path_prefix: /wires/, level: high}
  - {host: app.example.com, path_regex: '/(a+)+$', level: elevated}
default_level: standard
"""


@pytest.fixture(scope="module", params=["grpc", "http"])
def mstack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp(f"matching-{request.param}")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    settings = {"policy_poll_s": 3600}  # reloads only on SIGHUP, within the test's control
    with Stack(
        workdir / "stack", policy_file=policy, mode=request.param, extra_settings=settings
    ) as s:
        yield s


@pytest.fixture(scope="module")
def token(mstack: Stack) -> str:
    return asyncio.run(password_token(mstack))


def _req(method: str, target: str, token: str, host: str = HOST) -> bytes:
    return (
        f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode()


def _h2(stack: Stack, method: str, path: str, token: str) -> tuple[int, dict[str, str]]:
    """One HTTP/2 request (prior knowledge, cleartext) with ``:method`` exactly as given;
    h2 itself does not check its case."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    conn.initiate_connection()
    with socket.create_connection(("127.0.0.1", stack.listen_port), timeout=10) as s:
        s.sendall(conn.data_to_send())
        conn.send_headers(
            1,
            [
                (":method", method),
                (":scheme", "http"),
                (":authority", HOST),
                (":path", path),
                ("authorization", f"Bearer {token}"),
            ],
            end_stream=True,
        )
        s.sendall(conn.data_to_send())
        status, headers, done = 0, {}, False
        while not done:
            data = s.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                    headers = {
                        (k.decode() if isinstance(k, bytes) else k): (
                            v.decode() if isinstance(v, bytes) else v
                        )
                        for k, v in event.headers
                    }
                    status = int(headers[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
            s.sendall(conn.data_to_send())
        return status, headers


def _upstream(stack: Stack) -> int:
    return _counters(stack)[0]


# -- methods -------------------------------------------------------------------------------


def test_head_on_a_get_route_is_challenged_like_get(mstack: Stack, token: str) -> None:
    before = _upstream(mstack)
    for method in ("GET", "HEAD"):
        status, headers, _ = _http1(mstack, _req(method, "/accounts/1", token))
        assert (status, headers.get("x-stepup-reason")) == (401, "acr-insufficient"), method
        assert "acr_values=" in headers["www-authenticate"]
    assert _upstream(mstack) == before
    # The control: HEAD elsewhere reaches the upstream at the default level.
    status, _, _ = _http1(mstack, _req("HEAD", "/other/1", token))
    assert status == 200 and _upstream(mstack) == before + 1


def test_rendered_routes_carry_head_on_get_routes(mstack: Stack) -> None:
    doc = json.loads(json.dumps(mstack.envoy_config()))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    vhost = hcm["typed_config"]["route_config"]["virtual_hosts"][0]
    (accounts,) = [r for r in vhost["routes"] if r["name"] == "policy-1-elevated"]
    assert accounts["match"]["headers"] == [
        {"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}}
    ]


@pytest.mark.parametrize(
    ("method", "path"),
    [("post", "/transfer"), ("Post", "/transfer"), ("get", "/accounts/1"), ("post", "/other")],
)
def test_lower_case_method_over_http2_is_refused(
    mstack: Stack, token: str, method: str, path: str
) -> None:
    """Envoy's ``:method`` matchers are case-sensitive: ``post`` skips the POST route and
    its raise to ``high``. The service refuses it instead of reading it as POST."""
    before = _upstream(mstack)
    status, headers = _h2(mstack, method, path, token)
    assert (status, headers.get("x-stepup-reason")) == (403, "method-not-canonical"), headers
    assert headers.get("x-stepup-decision-id")  # the service answered, with a reference
    assert _upstream(mstack) == before


def test_upper_case_post_over_http2_is_challenged(mstack: Stack, token: str) -> None:
    status, headers = _h2(mstack, "POST", "/transfer", token)
    assert (status, headers.get("x-stepup-reason")) == (401, "acr-insufficient")


def test_lower_case_method_over_http1_never_reaches_the_upstream(mstack: Stack, token: str) -> None:
    before = _upstream(mstack)
    status, headers, _ = _http1(mstack, _req("post", "/transfer", token))
    assert status in (400, 403), (status, headers)  # Envoy's codec or the service refuses
    assert status == 400 or headers.get("x-stepup-reason") == "method-not-canonical"
    assert _upstream(mstack) == before


# -- prefixes ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/wires", "/wires?amount=1", "/wires/", "/wires/1", "//wires"])
def test_post_to_the_bare_segment_is_challenged(mstack: Stack, token: str, target: str) -> None:
    before = _upstream(mstack)
    status, headers, _ = _http1(mstack, _req("POST", target, token))
    assert (status, headers.get("x-stepup-reason")) == (401, "acr-insufficient"), target
    assert _upstream(mstack) == before


def test_another_segment_with_the_same_start_is_not_the_route(mstack: Stack, token: str) -> None:
    before = _upstream(mstack)
    status, _, body = _http1(mstack, _req("POST", "/wiresx", token))
    assert status == 200 and json.loads(body)["path"] == "/wiresx"  # the default level
    assert _upstream(mstack) == before + 1


# -- regexes -------------------------------------------------------------------------------


def test_a_path_built_against_the_regex_is_answered(mstack: Stack, token: str) -> None:
    """``/(a+)+$`` backtracks for seconds in Python's ``re`` on 32 characters; Envoy and the
    service run RE2: answered at once (the test's timeout is the fence), by the default
    level for the near-miss and the route's level for the match."""
    for n in (31, 4000):
        status, _, _ = _http1(mstack, _req("GET", "/" + "a" * n + "!", token))
        assert status == 200, n
    status, headers, _ = _http1(mstack, _req("GET", "/" + "a" * 31, token))
    assert (status, headers.get("x-stepup-reason")) == (401, "acr-insufficient")


# -- a repeated key --------------------------------------------------------------------------


def test_a_reload_with_a_repeated_key_keeps_the_last_good_policy(mstack: Stack, token: str) -> None:
    """A second ``high: {}`` further down would have made ``high`` ask for nothing: the
    reload is refused with the line, and ``/wires/1`` stays challenged."""
    good = mstack.policy_file.read_text()
    err = 'stepup_authz_policy_reloads_total{result="error"}'
    errors = metric(mstack, err)
    high = "  high:     {acr: [mfa, phr], max_age: 300}\n"
    mstack.policy_file.write_text(good.replace(high, high + "  high:     {}\n"))
    try:
        proc = mstack.service_proc
        assert proc is not None
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: metric(mstack, err) > errors, "the reload is refused")
        status, headers, _ = _http1(mstack, _req("POST", "/wires/1", token))
        assert (status, headers.get("x-stepup-reason")) == (401, "acr-insufficient")
        log = mstack.log_path("service").read_text()
        assert "line 7, column 3: duplicate key 'high' (first given at line 6)" in log
    finally:
        mstack.policy_file.write_text(good)


# -- without a stack: Envoy's own limits and the settings file --------------------------------


@pytest.mark.parametrize(
    ("pattern", "valid"),
    [("^/[a-z]{1,47}/[xy]$", True), ("^/[a-z]{1,47}/xy$", True), ("^/[a-z]{1,48}/x$", False)],
)
def test_policy_and_envoy_agree_on_regex_size(tmp_path: Path, pattern: str, valid: bool) -> None:
    """RE2 program sizes 99, 100 and 101: Envoy refuses a safe_regex above 100; the policy
    refuses the same ones, so what policy check accepts Envoy loads."""
    doc = {
        "levels": {"standard": {}, "high": {"acr": ["mfa"]}},
        "routes": [{"host": HOST, "path_regex": pattern, "level": "high"}],
        "default_level": "standard",
    }
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(doc))
    check = subprocess.run(
        [sys.executable, "-m", "authz.cli", "policy", "check", str(policy_file)],
        capture_output=True,
        text=True,
    )
    assert (check.returncode == 0) is valid, check.stderr
    assert "Traceback" not in check.stderr
    # Envoy's verdict on the same pattern, rendered with the size check lifted.
    import authz.core.policy as policy_module

    saved = policy_module.MAX_REGEX_PROGRAM_SIZE
    policy_module.MAX_REGEX_PROGRAM_SIZE = 10_000
    try:
        rendered = render_envoy(load_policy(doc))
    finally:
        policy_module.MAX_REGEX_PROGRAM_SIZE = saved
    out = tmp_path / "envoy.yaml"
    out.write_text(yaml.safe_dump(rendered, sort_keys=False))
    envoy = subprocess.run(
        [
            str(Path(sys.executable).parent / "envoy"),
            "--mode",
            "validate",
            "--disable-hot-restart",
            "--log-level",
            "error",
            "-c",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (envoy.returncode == 0) is valid, envoy.stdout + envoy.stderr
    if not valid:
        assert "RE2 program size of 101 > max program size of 100" in envoy.stdout + envoy.stderr
        assert "RE2 program size 101 > 100" in check.stderr


def test_serve_refuses_a_settings_file_with_a_repeated_key(tmp_path: Path) -> None:
    cfg = tmp_path / "settings.yaml"
    cfg.write_text(
        "policy_file: policy.yaml\n"
        "oidc:\n  issuer: https://idp\n  client_id: c\n  audience: a\n"
        "oidc:\n  issuer: https://other\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "authz.cli", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{cfg}:line 6, column 1: duplicate key 'oidc' (first given at line 2)" in r.stderr
