"""The Helm chart, checked by Helm itself (helm-python-sdk: Helm's Go library) and every
rendered manifest by the Kubernetes OpenAPI schemas (kubernetes-validate, offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from authz.policy_file import parse_policy_text
from authz.settings import Settings

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "k8s" / "stepup-authz"
VALUE_SETS = ["minimal", "url", "sentinel", "cluster"]
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1",
                                                        "PrometheusRule")}


def values(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "k8s" / "values" / f"{name}.yaml").read_text())
    return doc


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as c:
        yield c


def render(chart: Any, vals: dict[str, Any]) -> list[dict[str, Any]]:
    out = chart.render(vals, name="stepup-authz", namespace="stepup-authz", is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)
    return kinds


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_strict(value_set: str) -> None:
    report = helm.lint(CHART, values(value_set), strict=True, kube_version="v1.31.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_lint_and_schema_refuse_bad_values(chart: Any) -> None:
    """The checks can fail: values.schema.json refuses an http issuer and a fail-open port."""
    bad = values("minimal")
    bad["oidc"]["issuer"] = "http://idp.example.com"
    with pytest.raises(helm.HelmValuesError, match="issuer"):
        chart.validate_schema(bad)
    report = helm.lint(CHART, bad, strict=True)
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"])
    no_redis = values("minimal")
    del no_redis["redis"]["url"]
    with pytest.raises(helm.HelmError):
        chart.render(no_redis, name="x", namespace="x")  # no database is bundled


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_manifests_match_kubernetes_schemas(chart: Any, value_set: str) -> None:
    docs = render(chart, values(value_set))
    assert {"Deployment", "Service", "ConfigMap"} <= {d["kind"] for d in docs}
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue  # no schema shipped; checked in test_prometheus_operator_objects
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validate_can_fail(chart: Any) -> None:
    deployment = by_kind(render(chart, values("minimal")))["Deployment"][0]
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFilesystm"] = True  # a typo: strict mode refuses unknown fields
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_default_values_install_set(chart: Any) -> None:
    kinds = by_kind(render(chart, values("minimal")))
    assert sorted(kinds) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                             "NetworkPolicy", "PodDisruptionBudget", "Service",
                             "ServiceAccount"]
    assert "PrometheusRule" not in kinds  # the operator CRDs are opt-in


def test_deployment_hardening_and_probes(chart: Any) -> None:
    dep = by_kind(render(chart, values("url")))["Deployment"][0]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["grpc"]["port"] == 9191  # grpc.health.v1
    assert c["args"] == ["serve", "--config", "/etc/stepup-authz/config.yaml"]
    assert c["image"].startswith("ghcr.io/stepup-authz/stepup-authz@sha256:")
    assert pod["affinity"]["podAntiAffinity"]
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert "subPath" not in mounts["policy"]  # ConfigMap updates must reach the file
    assert {"redis-auth", "redis-tls", "oidc", "audit-signing-key", "encryption-key"} <= set(
        mounts)
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert {"checksum/config", "checksum/policy"} <= set(annotations)
    ports = {p["name"] for p in by_kind(render(chart, values("url")))["Service"][0]["spec"][
        "ports"]}
    assert ports == {"grpc", "http", "metrics"}


def _config(docs: list[dict[str, Any]], suffix: str, key: str) -> str:
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith(suffix):
            text: str = d["data"][key]
            return text
    raise AssertionError(f"no ConfigMap *{suffix}")


@pytest.mark.parametrize("value_set", [
    "minimal", "url", "sentinel", "cluster",
])
def test_rendered_settings_are_accepted_by_the_service(chart: Any, value_set: str) -> None:
    """The chart's config.yaml passes the service's own settings model (authz/settings.py)."""
    doc = yaml.safe_load(_config(render(chart, values(value_set)), "-config", "config.yaml"))
    settings = Settings.model_validate(doc)
    assert settings.grpc.port == 9191 and settings.http.port == 9192
    assert settings.grpc.host == "0.0.0.0"


def test_rendered_policy_keeps_level_order(chart: Any) -> None:
    text = _config(render(chart, values("minimal")), "-policy", "policy.yaml")
    policy = parse_policy_text(text, "chart").policy
    assert [lv.name for lv in policy.levels] == ["public", "standard", "elevated", "high"]
    example = (ROOT / "examples" / "policy.yaml").read_text()
    vals = values("minimal") | {"policy": {"content": example}}
    assert _config(render(chart, vals), "-policy", "policy.yaml").strip() == example.strip()


def test_prometheus_operator_objects(chart: Any) -> None:
    kinds = by_kind(render(chart, values("url")))
    (sm,) = kinds["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["name"] and sm["metadata"]["labels"]["release"]
    assert sm["spec"]["selector"]["matchLabels"]
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics",
                                        "interval": "15s"}]
    (rule,) = kinds["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"]
    # One copy of the rules: the chart ships exactly k8s/prometheus/rules.yaml.
    rules_file = yaml.safe_load((ROOT / "k8s" / "prometheus" / "rules.yaml").read_text())
    assert rule["spec"] == rules_file
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= r.keys()
