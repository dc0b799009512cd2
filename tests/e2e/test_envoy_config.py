"""The Envoy bootstrap the stack runs (``render envoy`` for the demo policy, both modes):
Envoy itself accepts it, its security-relevant settings are what the design says, and a
running Envoy fails closed without the authorizer."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.demo.stack import REPO_ROOT, Stack, redis_ping
from authz.render import ext_authz_filter

pytestmark = pytest.mark.e2e

EXT_AUTHZ = "envoy.filters.http.ext_authz"
DEMO_POLICY = REPO_ROOT / "examples" / "policy.yaml"


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    # No hot restart in validate mode: parallel runs must not contend for shared memory.
    return subprocess.run(
        [
            "envoy",
            "--mode",
            "validate",
            "--disable-hot-restart",
            "--log-level",
            "warn",
            "-c",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(params=["grpc", "http"])
def rendered(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """What ``Stack`` writes for Envoy (not started: only its files)."""
    stack = Stack(
        tmp_path / "stack", policy_file=DEMO_POLICY, mode=request.param, authz_timeout="0.3s"
    )
    stack._write_files()
    path = stack.workdir / "envoy.yaml"
    return path, yaml.safe_load(path.read_text())


def _hcm(doc: dict[str, Any]) -> dict[str, Any]:
    listener = doc["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def test_rendered_bootstrap_passes_envoy_validation(rendered: tuple[Path, dict[str, Any]]) -> None:
    path, _ = rendered
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_security_settings(rendered: tuple[Path, dict[str, Any]]) -> None:
    _, doc = rendered
    hcm = _hcm(doc)
    # One canonical path for the policy and the upstream.
    assert hcm["normalize_path"] is True
    assert hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert hcm["strip_trailing_host_dot"] is True
    # Edge proxy: the peer address is the client; no XFF hop trusted.
    assert hcm["use_remote_address"] is True
    assert hcm["xff_num_trusted_hops"] == 0

    filters = [f["name"] for f in hcm["http_filters"]]
    authz = ext_authz_filter(hcm)["typed_config"]
    # gRPC: Envoy's client address into the check's request first (authz/check/request.py).
    peer = ["envoy.filters.http.header_mutation"] if "grpc_service" in authz else []
    assert filters == [*peer, EXT_AUTHZ, "envoy.filters.http.router"]
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": 403}
    if "grpc_service" in authz:
        assert authz["transport_api_version"] == "V3"
        assert authz["grpc_service"]["envoy_grpc"]["cluster_name"] == "stepup_authz"
        assert authz["grpc_service"]["timeout"] == "0.3s"
        decision_id = "decision_id"
    else:
        assert authz["http_service"]["server_uri"]["timeout"] == "0.3s"
        decision_id = "x-stepup-decision-id"
    log = json.dumps(hcm["access_log"])
    assert f"%DYNAMIC_METADATA(envoy.filters.http.ext_authz:{decision_id})%" in log

    # The loopback hosts only (the demo policy names none), no catch-all.
    vhosts = hcm["route_config"]["virtual_hosts"]
    assert [v["domains"] for v in vhosts] == [["127.0.0.1"], ["localhost"]]
    routes = vhosts[0]["routes"]
    assert routes[0]["match"] == {"prefix": "/_stepup/"}  # first match wins: order matters
    assert routes[0]["route"]["cluster"] == "stepup_http"
    assert routes[0]["typed_per_filter_config"][EXT_AUTHZ]["disabled"] is True
    for r in routes[1:]:  # every other route is checked, at its level
        per_route = r["typed_per_filter_config"][EXT_AUTHZ]
        assert "disabled" not in per_route and per_route["check_settings"]
    assert routes[-1]["match"] == {"prefix": "/"}

    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    opts = clusters["stepup_authz"]["typed_extension_protocol_options"]
    http_opts = opts["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    expected = "http2_protocol_options" if "grpc_service" in authz else "http_protocol_options"
    assert expected in http_opts["explicit_http_config"]


def test_a_broken_bootstrap_fails_validation(
    rendered: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """The validation check can fail: an unknown field in the ext_authz config is refused."""
    _, doc = rendered
    ext_authz_filter(_hcm(doc))["typed_config"]["fail_open_when_tuesday"] = True
    bad = tmp_path / "broken.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = _validate(bad)
    assert result.returncode != 0
    assert "fail_open_when_tuesday" in result.stdout + result.stderr


# -- a running Envoy with no authorizer behind it ----------------------------------------------


@pytest.fixture(scope="module")
def no_authorizer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Only Envoy and the echo upstream (and Valkey) run: the ext_authz cluster has no server.
    stack = Stack(
        tmp_path_factory.mktemp("no-authz"),
        policy_file=DEMO_POLICY,
        with_service=False,
        with_idp=False,
    )
    with stack:
        yield stack


def _request(
    stack: Stack, raw_path: str, headers: dict[str, str] | None = None
) -> http.client.HTTPResponse:
    # http.client sends the path byte for byte: no client-side normalisation.
    conn = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=5)
    try:
        conn.request("GET", raw_path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp
    finally:
        conn.close()


def _get(stack: Stack, raw_path: str, headers: dict[str, str] | None = None) -> int:
    return _request(stack, raw_path, headers).status


@pytest.mark.parametrize("path", ["/accounts/123", "/wires/1", "/"])
def test_envoy_fails_closed_when_the_authorizer_is_down(no_authorizer: Stack, path: str) -> None:
    assert _get(no_authorizer, path) == 403


def test_stepup_route_skips_the_check(no_authorizer: Stack) -> None:
    # Routed straight to the (absent) service HTTP port: an upstream error, not an ext_authz 403.
    assert _get(no_authorizer, "/_stepup/start") == 503


def test_paths_are_normalised_before_routing_and_the_check(no_authorizer: Stack) -> None:
    # If '..' were resolved after routing, this would ride the unchecked /_stepup/ route (503).
    assert _get(no_authorizer, "/_stepup/../accounts/123") == 403
    assert _get(no_authorizer, "//_stepup/start") == 503  # merged to /_stepup/start
    assert _get(no_authorizer, "/wires%2F1") == 400  # encoded slash: refused
    assert _get(no_authorizer, "/accounts/1", {"x_stepup_user": "mallory"}) == 400


def _access_log_entry(
    stack: Stack, path: str, timeout: float = 5.0, **fields: object
) -> dict[str, Any]:
    """The first access log line for ``path`` (and ``fields``); Envoy flushes every 0.1 s."""
    deadline = time.monotonic() + timeout
    while True:
        for line in stack.log_path("envoy").read_text().splitlines():
            if not line.startswith("{"):
                continue  # Envoy's own warnings share the stream
            entry: dict[str, Any] = json.loads(line)
            if entry.get("path") == path and all(entry.get(k) == v for k, v in fields.items()):
                return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no access log line for {path} in {stack.log_path('envoy')}")
        time.sleep(0.05)


def test_access_log_is_json_with_the_decision_fields(no_authorizer: Stack) -> None:
    assert _get(no_authorizer, "/accounts/log-probe") == 403
    entry = _access_log_entry(no_authorizer, "/accounts/log-probe")
    assert entry["response_code"] == 403
    assert {"decision_id", "outcome", "reason", "method"} <= entry.keys()


# -- the full stack (demo policy) ---------------------------------------------------------------


def test_decision_id_reaches_the_access_log(stack: Stack) -> None:
    """The service's dynamic metadata lands in Envoy's access log under the ext_authz namespace,
    so a log line joins the ``x-stepup-decision-id`` the client saw and the audit record."""
    resp = _request(stack, "/accounts/123")
    assert resp.status == 401
    decision_id = resp.getheader("x-stepup-decision-id")
    assert decision_id
    entry = _access_log_entry(stack, "/accounts/123", decision_id=decision_id)
    assert entry["response_code"] == 401
    assert entry["reason"] == resp.getheader("x-stepup-reason")
    assert entry["outcome"]


def test_redis_restarts_on_the_same_port(stack: Stack) -> None:
    stack.stop_redis()
    assert not redis_ping(stack.redis_port)
    stack.start_redis()
    assert redis_ping(stack.redis_port)
    assert stack.redis_url.startswith(f"redis://127.0.0.1:{stack.redis_port}")


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_a_transaction_bound_route_buffers_the_whole_body_and_envoy_accepts_it(
    tmp_path: Path, mode: str
) -> None:
    """examples/policy-passkeys.yaml sends wires (POST /wires/) at a transaction-bound
    level: in the gRPC mode that route's check carries the whole body, exact bytes, and
    Envoy itself accepts the per-route buffering."""
    stack = Stack(
        tmp_path / "stack",
        policy_file=REPO_ROOT / "examples" / "policy-passkeys.yaml",
        mode=mode,  # type: ignore[arg-type]
        passkeys=True,
    )
    stack._write_files()
    path = stack.workdir / "envoy.yaml"
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    routes = _hcm(yaml.safe_load(path.read_text()))["route_config"]["virtual_hosts"][0]["routes"]
    checks = {
        r["name"]: r["typed_per_filter_config"][EXT_AUTHZ].get("check_settings", {}) for r in routes
    }
    [wire] = [name for name in checks if name.endswith("-wire")]
    if mode == "grpc":
        assert checks[wire]["with_request_body"] == {
            "max_request_bytes": 16384,
            "allow_partial_message": False,
            "pack_as_bytes": True,
        }
    else:  # the HTTP listener reads no body: the level's require_body then refuses
        assert "with_request_body" not in checks[wire]
    assert not [n for n, c in checks.items() if "with_request_body" in c and n != wire]
