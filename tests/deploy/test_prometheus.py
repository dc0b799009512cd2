"""Alert rules (promtool check + unit tests), the Grafana dashboard's queries, and a real
Prometheus on loopback scraping a running service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc
from prometheus_client import CollectorRegistry

from authz.app import Service, start_service
from authz.audit.metrics import AuditMetrics
from authz.audit.testing import dev_mac_settings
from authz.config.settings import Settings
from authz.devidp import DevClient, DevIdpConfig, base_url, bind, running
from authz.ops.health import Health
from authz.ops.metrics import Metrics
from tests.builders import check_request

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "k8s" / "prometheus" / "rules.yaml"
RULES_TEST = ROOT / "k8s" / "prometheus" / "rules_test.yaml"
DASHBOARD = ROOT / "k8s" / "grafana" / "stepup-authz.json"
NAME = re.compile(r"stepup_authz_[a-z_]+")
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def alert_names() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r]


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is required: apt-get install -y prometheus"
    return found


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can expose, with the type's suffixes."""
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "info": ["_info"],
        "gauge": [""],
        "summary": ["_sum", "_count", "_created"],
    }
    names = set()
    for family in registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
        names.update(s.name for s in family.samples)
    return names


def _service_registry() -> CollectorRegistry:
    """The service's registry as start_service builds it: core and audit collectors.
    audit_lag_seconds is the exporter's (a separate process, same names)."""
    metrics = Metrics()
    AuditMetrics(metrics.registry)
    # /readyz's probe owns the store gauge (stepup_authz_store_up)
    Health(metrics=metrics, store_ok=_never, keys_ready=bool, policy_loaded=bool)
    return metrics.registry


async def _never() -> bool:
    raise AssertionError("only the registry is read")


SERVICE_METRICS = exported_names(_service_registry())
PROCESS = re.compile(r"\b(process_[a-z_]+|python_[a-z_]+)")
RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_BASE = "https://github.com/stepup-authz/stepup-authz/blob/main/docs/runbooks.md#"


# -- promtool ---------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    r = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in r.stdout


def test_promtool_unit_tests() -> None:
    r = subprocess.run(
        [tool("promtool"), "test", "rules", RULES_TEST.name],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """Raise the fail-closed threshold past the test data: the firing case must break."""
    (tmp_path / "rules.yaml").write_text(RULES.read_text().replace(") > 0.01", ") > 0.5", 1))
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yaml")
    r = subprocess.run(
        [tool("promtool"), "test", "rules", "rules_test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode != 0
    assert "StepupAuthzFailClosedSpike" in r.stdout + r.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for t in case.get("alert_rule_test", []):
            (fired if t["exp_alerts"] else quiet).add(t["alertname"])
    assert alerts == fired == quiet


def test_rules_name_only_exported_metrics() -> None:
    text = RULES.read_text()
    used = set(NAME.findall(text))
    assert used and used <= SERVICE_METRICS, used - SERVICE_METRICS
    assert "envoy_http_ext_authz_failure_mode_allowed" in text


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces -."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def runbook_anchors() -> dict[str, str]:
    heads = re.findall(r"^## (.+)$", RUNBOOKS.read_text(), flags=re.M)
    return {github_anchor(h): h for h in heads}


def test_every_alert_has_a_runbook_entry() -> None:
    anchors = runbook_anchors()
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        url = rule["annotations"].get("runbook_url", "")
        assert url == RUNBOOK_BASE + github_anchor(rule["alert"]), rule["alert"]
        assert github_anchor(rule["alert"]) in anchors, f"no '## {rule['alert']}' in runbooks.md"
    # and one entry per alert, no orphan entries
    alert_anchors = {github_anchor(r["alert"]) for r in rules}
    orphans = {a for a, h in anchors.items() if h.startswith(("Stepup", "Envoy"))} - alert_anchors
    assert not orphans


def test_runbook_check_can_fail() -> None:
    assert github_anchor("StepupAuthzAuditLag") == "stepupauthzauditlag"
    assert "stepupauthznosuchalert" not in runbook_anchors()


# -- Grafana dashboard ------------------------------------------------------------------------


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def test_dashboard_queries_name_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = list(_exprs(dash["panels"]))
    assert len(exprs) >= 10
    used = {n for e in exprs for n in NAME.findall(e)}
    assert used <= SERVICE_METRICS, used - SERVICE_METRICS
    process = {n for e in exprs for n in PROCESS.findall(e)}
    all_names = {s.name for f in _service_registry().collect() for s in f.samples}
    assert process and process <= all_names, process - all_names
    # The panels the issue asks for.
    for needed in (
        "stepup_authz_checks_total",
        "stepup_authz_stepup_challenges_total",
        "stepup_authz_stepup_completions_total",
        "stepup_authz_redis_errors_total",
        "stepup_authz_check_duration_seconds_bucket",
        # the audit pipeline, signals, the funnel and the token cache
        "stepup_authz_audit_lag_seconds",
        "stepup_authz_audit_dropped_total",
        "stepup_authz_audit_quarantined_total",
        "stepup_authz_signals_total",
        "stepup_authz_token_cache_lookups_total",
        "stepup_authz_token_cache_entries",
        "stepup_authz_token_cache_capacity",
    ):
        assert needed in used
    # A gauge and counters never share a panel (the old token-cache panel summed an
    # unset gauge beside reload counts).
    for panel in dash["panels"]:
        panel_exprs = list(_exprs(panel))
        if any("token_cache_entries" in e for e in panel_exprs):
            assert all("token_cache_entries" in e for e in panel_exprs), panel["title"]
            assert all("_total" not in e for e in panel_exprs), panel["title"]
    assert any("histogram_quantile(0.99" in e for e in exprs)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_check_can_fail() -> None:
    assert not {"stepup_authz_checks_totl"} <= SERVICE_METRICS


# -- a real Prometheus scraping a running service --------------------------------------------

PUBLIC = "http://app.test"


@pytest.fixture
async def service(redis_url: str, redis_prefix: str) -> AsyncIterator[Service]:
    sock = bind()
    idp = base_url(sock)
    cfg = DevIdpConfig(
        issuer=idp,
        clients={"stepup-authz": DevClient("dev-secret", (f"{PUBLIC}/_stepup/callback",))},
    )
    async with running(cfg, sock):
        settings = Settings.model_validate(
            {
                "policy_file": str(ROOT / "examples" / "policy.yaml"),
                "grpc": {"port": 0},
                "http": {"port": 0},
                "redis": {"url": redis_url, "key_prefix": redis_prefix},
                "oidc": {
                    "issuer": idp,
                    "client_id": "stepup-authz",
                    "client_secret": "dev-secret",
                    "audience": "stepup-demo",
                    "algorithms": ["RS256"],
                },
                "stepup": {"public_url": PUBLIC, "cookie_secure": False},
                "audit": dev_mac_settings(),
            }
        )
        svc = await start_service(settings)
        try:
            yield svc
        finally:
            await svc.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> Any:
    with _no_proxy.open(url, timeout=2) as resp:
        body = resp.read()
        return json.loads(body) if "json" in resp.headers.get("Content-Type", "") else body


@contextlib.contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[str]:
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "stepup-authz",
                        "metrics_path": "/metrics",
                        "static_configs": [{"targets": [target]}],
                    }
                ],
            }
        )
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def _poll(url: str, within: float, done: Any) -> Any:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            last = await asyncio.to_thread(_get_json, url)
            if done(last):
                return last
        await asyncio.sleep(0.25)
    raise AssertionError(f"{url}: not done after {within}s; last answer {last!r}")


async def test_prometheus_scrapes_the_service(service: Service, tmp_path: Path) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    try:
        for path in ("/accounts/1", "/wires/2", "/public/x", "/news"):
            await stub.Check(check_request(path))
    finally:
        await channel.close()
    target = f"127.0.0.1:{service.http_port}"
    with prometheus(tmp_path, target) as prom:
        await _poll(f"{prom}/-/ready", 20, lambda body: b"Ready" in body)
        query = urllib.parse.quote("sum(stepup_authz_checks_total)")
        answer = await _poll(
            f"{prom}/api/v1/query?query={query}", 20, lambda a: a["data"]["result"]
        )
        assert float(answer["data"]["result"][0]["value"][1]) == 4
        by_outcome = await _poll(
            f"{prom}/api/v1/query?query="
            + urllib.parse.quote("sum by (outcome) (stepup_authz_checks_total)"),
            5,
            lambda a: a["data"]["result"],
        )
        outcomes = {r["metric"]["outcome"] for r in by_outcome["data"]["result"]}
        assert outcomes <= {"allow", "login", "step_up", "deny", "error"} and outcomes
        # Prometheus loaded the alert rules, and every name it scraped is one we predict.
        rules = await _poll(f"{prom}/api/v1/rules", 5, lambda a: a["data"]["groups"])
        assert len(rules["data"]["groups"][0]["rules"]) == len(alert_names())
        names = await _poll(
            f"{prom}/api/v1/label/__name__/values",
            5,
            lambda a: any(n.startswith("stepup_authz_") for n in a["data"]),
        )
        scraped = {n for n in names["data"] if n.startswith("stepup_authz_")}
        assert scraped <= SERVICE_METRICS, scraped - SERVICE_METRICS
        assert "stepup_authz_check_duration_seconds_bucket" in scraped
        # The token cache's gauges are set by the service (its capacity from the settings).
        cap = await _poll(
            f"{prom}/api/v1/query?query=" + urllib.parse.quote("stepup_authz_token_cache_capacity"),
            5,
            lambda a: a["data"]["result"],
        )
        assert float(cap["data"]["result"][0]["value"][1]) == 10_000
        assert "stepup_authz_token_cache_entries" in scraped
        assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= set(names["data"])
        # Every dashboard query is valid PromQL to this Prometheus (Grafana's variables
        # filled in as Grafana would).
        dash = json.loads(DASHBOARD.read_text())
        for expr in _exprs(dash["panels"]):
            q = (
                expr.replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace("$namespace", ".*")
            )
            answer = await asyncio.to_thread(
                _get_json, f"{prom}/api/v1/query?query={urllib.parse.quote(q)}"
            )
            assert answer["status"] == "success", (expr, answer)
