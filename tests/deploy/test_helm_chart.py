"""The Helm chart, checked by Helm itself (helm-python-sdk: Helm's Go library) and every
rendered manifest by the Kubernetes OpenAPI schemas (kubernetes-validate, offline)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import redis
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from authz.audit.config import ExporterSettings, load_exporter_settings
from authz.audit.exporter import make_exporter_client
from authz.audit.metrics import AuditMetrics
from authz.config.policy_file import parse_policy_text
from authz.config.settings import Settings
from tests.deploy.chart import (
    AUDIT_REDIS,
    CHART,
    EXPORTER,
    ROOT,
    SERVICE,
    SIGNING_SECRET,
    by_kind,
    named,
    raw_values,
    render,
    values,
)
from tests.tlsutil import cert as tls_cert
from tests.tlsutil import pem

pytestmark = pytest.mark.deploy

KEYS_SECRET = "stepup-authz-keys"
VALUE_SETS = ["minimal", "url", "sentinel", "cluster", "audit-acl"]
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


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
        "readOnlyRootFilesystm"
    ] = True  # a typo: strict mode refuses unknown fields
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_default_values_install_set(chart: Any) -> None:
    kinds = by_kind(render(chart, values("minimal")))
    assert sorted(kinds) == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Secret",  # the keys every replica shares (test_helm_keys.py)
        "Service",
        "ServiceAccount",
    ]
    assert "PrometheusRule" not in kinds  # the operator CRDs are opt-in
    assert sorted(d["metadata"]["name"] for d in kinds["Deployment"]) == [SERVICE, EXPORTER]


def test_deployment_hardening_and_probes(chart: Any) -> None:
    dep = named(render(chart, values("url")), "Deployment", SERVICE)
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
    # url.yaml puts TLS on the gRPC port, which the kubelet's gRPC probe cannot speak.
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    plain = named(render(chart, values("minimal")), "Deployment", SERVICE)
    (plain_c,) = plain["spec"]["template"]["spec"]["containers"]
    assert plain_c["startupProbe"]["grpc"]["port"] == 9191  # grpc.health.v1
    assert c["args"] == ["serve", "--config", "/etc/stepup-authz/config.yaml"]
    assert c["image"].startswith("ghcr.io/stepup-authz/stepup-authz@sha256:")
    assert pod["affinity"]["podAntiAffinity"]
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert "subPath" not in mounts["policy"]  # ConfigMap updates must reach the file
    assert {"redis-auth", "redis-tls", "oidc", "keys", "tls"} <= set(mounts)
    assert "audit-signing-key" not in mounts  # the exporter's alone (test below)
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert {"checksum/config", "checksum/policy"} <= set(annotations)
    ports = {
        p["name"] for p in named(render(chart, values("url")), "Service", SERVICE)["spec"]["ports"]
    }
    assert ports == {"grpc", "http", "metrics"}


def _config(docs: list[dict[str, Any]], suffix: str, key: str) -> str:
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith(suffix):
            text: str = d["data"][key]
            return text
    raise AssertionError(f"no ConfigMap *{suffix}")


@pytest.mark.parametrize(
    "value_set",
    [
        "minimal",
        "url",
        "sentinel",
        "cluster",
    ],
)
def test_rendered_settings_are_accepted_by_the_service(chart: Any, value_set: str) -> None:
    """The chart's config.yaml passes the service's own settings model."""
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
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
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


# -- the audit exporter -----------------------------------------------------------------------


def _pod(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    spec: dict[str, Any] = named(docs, "Deployment", name)["spec"]["template"]["spec"]
    return spec


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def _secret_users(docs: list[dict[str, Any]], secret: str) -> list[str]:
    """Every "<workload>/<container>" whose pod mounts a volume of this Secret."""
    users = []
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"):
            continue
        pod = d["spec"]["template"]["spec"]
        vols = {
            v["name"]
            for v in pod.get("volumes", [])
            if v.get("secret", {}).get("secretName") == secret
        }
        for c in pod.get("initContainers", []) + pod["containers"]:
            if vols & {m["name"] for m in c.get("volumeMounts", [])}:
                users.append(f"{d['metadata']['name']}/{c['name']}")
    return users


def _exporter_settings(docs: list[dict[str, Any]], tmp_path: Path) -> ExporterSettings:
    """The rendered exporter.yaml, loaded exactly as `stepup-authz audit exporter --config`
    loads it (authz/audit/cli.py -> load_exporter_settings)."""
    path = tmp_path / "exporter.yaml"
    path.write_text(named(docs, "ConfigMap", EXPORTER)["data"]["exporter.yaml"])
    return load_exporter_settings(path)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_exporter_is_one_replica_recreate_apart_from_the_service(
    chart: Any, value_set: str
) -> None:
    docs = render(chart, values(value_set))
    dep = named(docs, "Deployment", EXPORTER)
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}  # never two writers at once
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["audit", "exporter", "--config", "/etc/stepup-authz/exporter.yaml"]
    # Nothing scales it, and nothing of the service selects its pod: not the Service (no
    # ext_authz traffic to it), the service's Deployment, PDB or NetworkPolicy.
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for hpa in by_kind(docs).get("HorizontalPodAutoscaler", []):
        assert hpa["spec"]["scaleTargetRef"]["name"] == SERVICE
    assert not _matches(named(docs, "Service", SERVICE)["spec"]["selector"], labels)
    assert not _matches(
        named(docs, "Deployment", SERVICE)["spec"]["selector"]["matchLabels"], labels
    )
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for d in by_kind(docs).get(kind, []):
            if d["metadata"]["name"] == SERVICE:
                sel = d["spec"].get("selector") or d["spec"]["podSelector"]
                assert not _matches(sel["matchLabels"], labels)
    assert _matches(dep["spec"]["selector"]["matchLabels"], labels)
    assert _matches(named(docs, "Service", EXPORTER)["spec"]["selector"], labels)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_signing_key_is_mounted_only_in_the_exporter(chart: Any, value_set: str) -> None:
    docs = render(chart, values(value_set))
    assert _secret_users(docs, SIGNING_SECRET) == [f"{EXPORTER}/audit-exporter"]
    (c,) = _pod(docs, EXPORTER)["containers"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "audit-signing-key")
    assert mount["readOnly"] is True
    off = render(chart, values(value_set) | {"auditExporter": {"enabled": False}})
    assert _secret_users(off, SIGNING_SECRET) == []
    assert not [d for d in off if d["metadata"]["name"].startswith(EXPORTER)]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_exporter_settings_are_accepted_by_the_exporter(
    chart: Any, value_set: str, tmp_path: Path
) -> None:
    """exporter.yaml passes the exporter's own loader and agrees with the service's
    config.yaml (stream, Redis) and with the pod (key, archive volume, metrics port)."""
    vals = values(value_set)
    docs = render(chart, vals)
    x = _exporter_settings(docs, tmp_path)
    service = Settings.model_validate(yaml.safe_load(_config(docs, "-config", "config.yaml")))
    assert x.stream_key == service.audit.stream_key == "stepup:audit"
    stream_redis = service.audit.redis_url or service.redis.url
    assert stream_redis is not None and x.redis_url == stream_redis
    pod = _pod(docs, EXPORTER)
    (c,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    key_dir = str(x.signing_key_file.parent)
    assert volumes[mounts[key_dir]["name"]]["secret"]["secretName"] == SIGNING_SECRET
    assert x.signing_key_file.name == vals["secrets"]["auditSigningKey"].get(
        "key", "audit-signing.pem"
    )
    archive = mounts["/var/lib/stepup-authz/audit"]
    assert x.archive_dir.is_relative_to(archive["mountPath"])
    assert not archive.get("readOnly") and "persistentVolumeClaim" in volumes[archive["name"]]
    assert x.metrics_host == "0.0.0.0"
    (port,) = c["ports"]
    assert port == {"name": "metrics", "containerPort": x.metrics_port, "protocol": "TCP"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    # The service's Redis password and CA files (redis.auth, redis.tls), from mounts of the
    # same Secrets in the exporter's own container; with audit.acl, the password of the
    # exporter's own Redis user instead (the service's user has another).
    acl = vals.get("audit", {}).get("acl", {})
    password_secret = vals["redis"].get("auth", {}).get("existingSecret")
    if acl.get("enabled"):
        password_secret = acl["exporterPassword"]["existingSecret"]
        assert x.username == "stepup-audit-exporter"
        assert service.audit.username == "stepup-audit-writer"
        assert service.audit.password_file is not None
        # The same path in two pods, each a mount of its own user's Secret alone.
        writer = acl["servicePassword"]["existingSecret"]
        assert _secret_users(docs, writer) == [f"{SERVICE}/stepup-authz"]
        assert _secret_users(docs, password_secret) == [f"{EXPORTER}/audit-exporter"]
    else:
        assert x.password_file == service.redis.password_file
    assert x.ca_file == service.redis.ca_file
    # Both verify and MAC with the same keys, from the one Secret.
    assert x.mac_keys == service.audit.mac_keys and service.audit.mac_active_kid in x.mac_keys
    mac_mount = mounts[str(next(iter(x.mac_keys.values())).parent)]
    assert volumes[mac_mount["name"]]["secret"]["secretName"] == KEYS_SECRET
    for f, secret in (
        (x.password_file, password_secret),
        (x.ca_file, vals["redis"].get("tls", {}).get("existingSecret")),
    ):
        assert (f is None) == (not secret)
        if f is not None:
            mount = mounts[str(f.parent)]
            assert mount["readOnly"] is True
            assert volumes[mount["name"]]["secret"]["secretName"] == secret


def test_exporter_settings_follow_values(chart: Any, tmp_path: Path) -> None:
    vals = values("minimal") | {
        "audit": {
            "streamKey": "brokerage:audit",
            "redisUrl": AUDIT_REDIS,
        },
        "auditExporter": {
            "segmentMaxBytes": 8 * 1024 * 1024,
            "segmentMaxAgeSeconds": 900,
            "checkpointEvery": 200,
            "checkpointIntervalSeconds": 15,
            "metricsPort": 9500,
        },
    }
    docs = render(chart, vals)
    x = _exporter_settings(docs, tmp_path)
    service = Settings.model_validate(yaml.safe_load(_config(docs, "-config", "config.yaml")))
    assert (x.stream_key, x.redis_url) == ("brokerage:audit", AUDIT_REDIS)
    assert (service.audit.stream_key, service.audit.redis_url) == (x.stream_key, x.redis_url)
    assert (x.segment_max_bytes, x.segment_max_age_s) == (8 * 1024 * 1024, 900)
    assert (x.checkpoint_every, x.checkpoint_interval_s) == (200, 15)
    assert named(docs, "Service", EXPORTER)["spec"]["ports"][0]["port"] == 9500


def test_exporter_redis_password_comes_from_the_secret(chart: Any, tmp_path: Path) -> None:
    """The exporter's own container mounts the Redis auth (and CA) Secret and its settings
    name the files (password_file, ca_file), as the service's do: no init container, no
    password in the ConfigMap or the URL. The rendered settings, with those two paths
    pointed at local copies, give the exporter's client the password and the CA."""
    vals = values("url")
    docs = render(chart, vals)
    cm = named(docs, "ConfigMap", EXPORTER)["data"]
    assert set(cm) == {"exporter.yaml"}  # no script beside the settings
    assert (
        redis.Redis.from_url(
            yaml.safe_load(cm["exporter.yaml"])["redis_url"]
        ).connection_pool.connection_kwargs.get("password")
        is None
    )
    pod = _pod(docs, EXPORTER)
    assert "initContainers" not in pod
    (c,) = pod["containers"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    auth, tls = vals["redis"]["auth"], vals["redis"]["tls"]
    assert volumes["redis-auth"]["secret"]["secretName"] == auth["existingSecret"]
    assert volumes["redis-tls"]["secret"]["secretName"] == tls["existingSecret"]
    assert mounts["redis-auth"]["readOnly"] is True and mounts["redis-tls"]["readOnly"] is True
    assert "run" not in volumes  # the init container's in-memory settings copy is gone
    assert mounts["config"]["mountPath"] == "/etc/stepup-authz/exporter.yaml"
    assert sorted(_secret_users(docs, auth["existingSecret"])) == [
        f"{EXPORTER}/audit-exporter",
        f"{SERVICE}/stepup-authz",
    ]
    assert sorted(_secret_users(docs, tls["existingSecret"])) == [
        f"{EXPORTER}/audit-exporter",
        f"{SERVICE}/stepup-authz",
    ]

    x = _exporter_settings(docs, tmp_path)
    assert x.password_file == Path(mounts["redis-auth"]["mountPath"]) / auth["key"]
    assert x.ca_file == Path(mounts["redis-tls"]["mountPath"]) / tls["caKey"]
    assert x.redis_url == vals["redis"]["url"]  # no password, no ssl_ca_certs argument

    password = "p@ss:w/rd#1?"
    (tmp_path / "password").write_text(password + "\n")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(_self_signed_ca_pem())
    local = x.model_copy(update={"password_file": tmp_path / "password", "ca_file": ca})
    client = make_exporter_client(local)
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["password"] == password
        assert kwargs["host"] == "redis-master.redis.svc.cluster.local" and kwargs["port"] == 6380
        assert kwargs["ssl_ca_certs"] == str(ca)
        assert kwargs["ssl_check_hostname"] is True
    finally:
        client.close()
    no_auth = values("url")
    del no_auth["redis"]["auth"], no_auth["redis"]["tls"]
    docs = render(chart, no_auth)
    x = _exporter_settings(docs, tmp_path)
    assert (x.password_file, x.ca_file) == (None, None)
    (c,) = _pod(docs, EXPORTER)["containers"]
    assert not {"redis-auth", "redis-tls"} & {m["name"] for m in c["volumeMounts"]}


def _self_signed_ca_pem() -> bytes:
    """A throwaway self-signed CA certificate (PEM): what a ca_file must hold."""
    key = ec.generate_private_key(ec.SECP256R1())
    return pem(tls_cert("test CA", key, None, key, ca=True))


def test_exporter_hardening(chart: Any) -> None:
    docs = render(chart, values("url"))
    pod = _pod(docs, EXPORTER)
    service_pod = _pod(docs, SERVICE)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert pod["automountServiceAccountToken"] is False
    (svc_c,) = service_pod["containers"]
    assert "initContainers" not in pod
    for c in pod["containers"]:
        assert c["securityContext"] == svc_c["securityContext"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"] and c["resources"]["limits"]
        assert c["image"] == svc_c["image"]
    (c,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["name"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"archive", "tmp"}
    assert volumes["archive"]["persistentVolumeClaim"]["claimName"] == f"{EXPORTER}-archive"


def test_exporter_archive_volume(chart: Any) -> None:
    (pvc,) = by_kind(render(chart, values("minimal")))["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == f"{EXPORTER}-archive"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert "storageClassName" not in pvc["spec"]  # the cluster default
    vals = values("minimal") | {
        "auditExporter": {
            "persistence": {
                "size": "200Gi",
                "storageClass": "gp3-encrypted",
                "accessModes": ["ReadWriteOncePod"],
                "keep": False,
            }
        }
    }
    (pvc,) = by_kind(render(chart, vals))["PersistentVolumeClaim"]
    assert pvc["spec"]["storageClassName"] == "gp3-encrypted"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOncePod"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert "annotations" not in pvc["metadata"]
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(pvc, version, strict=True)
    vals["auditExporter"]["persistence"]["storageClass"] = "-"
    (pvc,) = by_kind(render(chart, vals))["PersistentVolumeClaim"]
    assert pvc["spec"]["storageClassName"] == ""
    existing = values("minimal") | {
        "auditExporter": {"persistence": {"existingClaim": "audit-archive"}}
    }
    docs = render(chart, existing)
    assert "PersistentVolumeClaim" not in by_kind(docs)
    archive = next(v for v in _pod(docs, EXPORTER)["volumes"] if v["name"] == "archive")
    assert archive["persistentVolumeClaim"] == {"claimName": "audit-archive"}


def test_exporter_network_policy(chart: Any) -> None:
    docs = render(chart, values("url"))
    pol = named(docs, "NetworkPolicy", EXPORTER)
    labels = named(docs, "Deployment", EXPORTER)["spec"]["template"]["metadata"]["labels"]
    assert _matches(pol["spec"]["podSelector"]["matchLabels"], labels)
    assert pol["spec"]["policyTypes"] == ["Ingress", "Egress"]
    egress_ports = {p["port"] for rule in pol["spec"]["egress"] for p in rule["ports"]}
    # Redis (url.yaml's TLS port) and DNS only
    assert egress_ports == {6380, 53} and 443 not in egress_ports
    (ingress,) = pol["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    extra = values("url") | {
        "auditExporter": {"extraEgress": [{"ports": [{"port": 443, "protocol": "TCP"}]}]}
    }
    pol = named(render(chart, extra), "NetworkPolicy", EXPORTER)
    assert {"ports": [{"port": 443, "protocol": "TCP"}]} in pol["spec"]["egress"]


def test_service_monitor_scrapes_the_exporter(chart: Any) -> None:
    """The ServiceMonitor selects the exporter's Service too, so the exporter's
    stepup_authz_audit_lag_seconds is scraped and StepupAuthzAuditExporterDown (absent())
    means what it says."""
    docs = render(chart, values("url"))
    (sm,) = by_kind(docs)["ServiceMonitor"]
    selector = sm["spec"]["selector"]["matchLabels"]
    (endpoint,) = sm["spec"]["endpoints"]
    for name in (SERVICE, EXPORTER):
        svc = named(docs, "Service", name)
        assert _matches(selector, svc["metadata"]["labels"])
        assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert _matches(
        named(docs, "Service", EXPORTER)["spec"]["selector"],
        named(docs, "Deployment", EXPORTER)["spec"]["template"]["metadata"]["labels"],
    )
    registry = CollectorRegistry()
    AuditMetrics(registry)  # what the exporter serves on metrics_port
    assert "stepup_authz_audit_lag_seconds" in {f.name for f in registry.collect()}
    (rule,) = by_kind(docs)["PrometheusRule"]
    down = next(
        r
        for g in rule["spec"]["groups"]
        for r in g["rules"]
        if r.get("alert") == "StepupAuthzAuditExporterDown"
    )
    assert "stepup_authz_audit_lag_seconds" in down["expr"]


def test_exporter_refuses_incomplete_values(chart: Any) -> None:
    """Fail at render, not at 3 a.m.: no signing key, or a topology the exporter's single
    redis_url cannot follow, stops the install with a message saying what to set."""
    no_key = copy.deepcopy(raw_values("minimal"))
    no_key.pop("secrets")
    with pytest.raises(helm.HelmError, match=r"secrets\.auditSigningKey\.existingSecret"):
        chart.render(no_key, name="x", namespace="x")
    for value_set in ("sentinel", "cluster"):
        vals = copy.deepcopy(raw_values(value_set))
        vals["audit"].pop("redisUrl")
        with pytest.raises(helm.HelmError, match=r"audit\.redisUrl"):
            chart.render(vals, name="x", namespace="x")
    off = raw_values("minimal") | {"auditExporter": {"enabled": False}}
    assert EXPORTER not in {d["metadata"]["name"] for d in render(chart, off)}


def test_schema_refuses_bad_exporter_values(chart: Any) -> None:
    for bad in (
        {"batchSize": 0},
        {"metricsPort": 70000},
        {"segmentMaxBytes": 10},
        {"replicas": 2},
        {"persistence": {"accessModes": ["ReadOnlyMany"]}},
    ):
        vals = values("minimal") | {"auditExporter": bad}
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(vals)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values("minimal") | {"audit": {"redisUrl": "http://x"}})


# -- the audit trail's keys and its Redis's ACL users ------------------------------------------


def test_mac_keys_are_mounted_in_the_service_and_the_exporter_alone(chart: Any) -> None:
    """The MAC keys are entries of the keys Secret every replica shares. The exporter's
    volume projects those entries alone: it never holds the field encryption or link keys."""
    docs = render(chart, values("url"))
    assert sorted(_secret_users(docs, KEYS_SECRET)) == [
        f"{EXPORTER}/audit-exporter",
        f"{SERVICE}/stepup-authz",
    ]
    service = Settings.model_validate(yaml.safe_load(_config(docs, "-config", "config.yaml")))
    assert service.audit.mac_keys == {"m1": Path("/etc/stepup-authz/secrets/keys/audit-mac-m1")}
    assert service.audit.mac_active_kid == "m1"
    exporter = named(docs, "Deployment", EXPORTER)["spec"]["template"]["spec"]
    (vol,) = [
        v for v in exporter["volumes"] if v.get("secret", {}).get("secretName") == KEYS_SECRET
    ]
    assert vol["secret"]["items"] == [{"key": "audit-mac-m1", "path": "audit-mac-m1"}]


def test_the_chart_refuses_incomplete_audit_values(chart: Any) -> None:
    bad_kid = values("minimal") | {"keys": {"auditMac": {"kids": ["m1"], "activeKid": "m9"}}}
    with pytest.raises(helm.HelmError, match=r"keys\.auditMac\.activeKid"):
        chart.render(bad_kid, name="x", namespace="x")
    acl = values("audit-acl")
    acl["audit"].pop("redisUrl")
    with pytest.raises(helm.HelmError, match=r"acl\.enabled needs audit\.redisUrl"):
        chart.render(acl, name="x", namespace="x")
    acl = values("audit-acl")
    acl["audit"]["acl"]["exporterPassword"]["existingSecret"] = ""
    with pytest.raises(helm.HelmError, match="exporterPassword"):
        chart.render(acl, name="x", namespace="x")
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(
            values("minimal") | {"keys": {"auditMac": {"kids": ["a b"], "activeKid": "a b"}}}
        )


def _acl_lines(docs: list[dict[str, Any]], key: str) -> list[str]:
    data = named(docs, "ConfigMap", "stepup-authz-audit-acl")["data"]
    return [line for line in data[key].splitlines() if line]


def test_the_acl_users_hold_on_a_real_valkey(chart: Any, tmp_path: Path) -> None:
    """The rendered ACL rules, loaded into a real Valkey as docs/audit.md says, with the
    rendered settings of the service and the exporter (their mounted files replaced by
    local copies): the service's user writes its records and can do nothing else to the
    stream; the exporter's user archives them and cannot add, delete or re-id entries."""
    import asyncio

    from authz.audit.chain import SigningKey
    from authz.audit.export import read_records
    from authz.audit.exporter import build_exporter
    from authz.audit.service import build_auditor
    from authz.audit.testing import sample_event, write_mac_key
    from authz.store.connections import EmbeddedValkey

    docs = render(chart, values("audit-acl"))
    writer_rules = _acl_lines(docs, "service-user.acl")
    exporter_rules = _acl_lines(docs, "exporter-user.acl")
    assert writer_rules[0] == "stepup-audit-writer" and "+xadd" in writer_rules
    assert "+xadd" not in exporter_rules and "(~stepup:audit:head +xadd)" in exporter_rules
    for bad in ("+@all", "allkeys", "+xdel", "+xsetid", "+del", "+xgroup"):
        assert bad not in writer_rules + exporter_rules

    k1, k2 = write_mac_key(tmp_path / "k1"), write_mac_key(tmp_path / "k2")
    (tmp_path / "writer-pw").write_text("writer-secret\n")
    (tmp_path / "exporter-pw").write_text("exporter-secret\n")
    (tmp_path / "signing.pem").write_bytes(SigningKey.generate().private_pem())
    server = EmbeddedValkey()
    url = server.start()
    admin = redis.Redis.from_url(url)
    try:
        admin.execute_command("ACL", "SETUSER", *writer_rules, ">writer-secret")
        admin.execute_command("ACL", "SETUSER", *exporter_rules, ">exporter-secret")
        macs = {"m1": k1, "m2": k2}
        rendered = yaml.safe_load(_config(docs, "-config", "config.yaml"))
        service = Settings.model_validate(rendered).model_copy(
            update={
                "redis": Settings.model_validate(rendered).redis.model_copy(
                    update={"url": url, "password_file": None, "ca_file": None}
                )
            }
        )
        service = service.model_copy(
            update={
                "audit": service.audit.model_copy(
                    update={
                        "redis_url": url,
                        "password_file": tmp_path / "writer-pw",
                        "mac_keys": macs,
                    }
                )
            }
        )

        async def produce() -> None:
            from authz.audit.metrics import AuditMetrics

            closers: list[object] = []
            auditor = build_auditor(service, None, None, AuditMetrics(CollectorRegistry()), closers)
            assert auditor is not None
            for i in range(3):
                await auditor.durable(sample_event(i))
            await auditor.aclose()
            for c in reversed(closers[:-1]):
                await c.aclose()  # type: ignore[attr-defined]

        asyncio.run(produce())
        host, port = url.split("//")[1].split("/")[0].split(":")
        writer = redis.Redis(
            host=host, port=int(port), username="stepup-audit-writer", password="writer-secret"
        )
        for cmd in (
            ("XRANGE", "stepup:audit", "-", "+"),
            ("XDEL", "stepup:audit", "0-1"),
            ("XSETID", "stepup:audit", "99999999999999-0", "MAXDELETEDID", "0-1"),
            ("XTRIM", "stepup:audit", "MAXLEN", "0"),
            ("DEL", "stepup:audit"),
            ("XADD", "stepup:audit:head", "*", "cp", "forged"),
            ("SET", "stepup:session", "x"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                writer.execute_command(*cmd)
        writer.close()

        x = _exporter_settings(docs, tmp_path).model_copy(
            update={
                "redis_url": url,
                "password_file": tmp_path / "exporter-pw",
                "ca_file": None,
                "mac_keys": macs,
                "signing_key_file": tmp_path / "signing.pem",
                "archive_dir": tmp_path / "archive",
            }
        )
        ex = build_exporter(x, CollectorRegistry())
        ex.start()
        while ex.poll(block_ms=None):
            pass
        for cmd in (
            ("XADD", "stepup:audit", "*", "r", "forged"),
            ("XDEL", "stepup:audit", "0-1"),
            ("XSETID", "stepup:audit", "99999999999999-0"),
            ("DEL", "stepup:audit"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                ex.client.execute_command(*cmd)
        ex.close()  # the shutdown checkpoint, published to <stream>:head by the same user
        ex.client.close()
        types = [r["type"] for r in read_records([tmp_path / "archive"])]
        assert types[0] == "audit.producer_started" and types[-1] == "audit.producer_stopped"
        assert len(types) == 5 and "audit.quarantined" not in types
        assert admin.xlen("stepup:audit:head") >= 1
    finally:
        admin.close()
        server.stop()
