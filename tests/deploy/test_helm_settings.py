"""The chart's keys and settings (issue 14, item 6): one set of keys for every replica and
worker, every setting reachable from values, and what an Istio sidecar needs from the
NetworkPolicies. Rendered by Helm's own library; settings checked by the service's model.

The operator's story: a release with the default three replicas must never run each pod on
its own random keys (a step-up on pod A refused by pod B, grants unreadable across pods,
every rollout dropping them all), and no setting may be out of reach of values (trusted
hops behind a gateway, TLS, the HTTP mode, workers).
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from authz.config.settings import Settings
from authz.store.crypto import parse_key
from tests.deploy.chart import EXPORTER, SERVICE, by_kind, named, render, values

pytestmark = pytest.mark.deploy

KEYS_DIR = "/etc/stepup-authz/secrets/keys"
KEYS_SECRET = "stepup-authz-keys"


def settings_doc(docs: list[dict[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(
        named(docs, "ConfigMap", f"{SERVICE}-config")["data"]["config.yaml"]
    )
    return doc


def container(docs: list[dict[str, Any]], name: str = SERVICE) -> dict[str, Any]:
    (c,) = named(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def volumes(docs: list[dict[str, Any]], name: str = SERVICE) -> dict[str, dict[str, Any]]:
    pod = named(docs, "Deployment", name)["spec"]["template"]["spec"]
    return {v["name"]: v for v in pod["volumes"]}


def mounted_secret(docs: list[dict[str, Any]], path: str) -> str:
    """The Secret whose volume the service's container mounts at ``path``'s directory."""
    mounts = {m["mountPath"]: m for m in container(docs)["volumeMounts"]}
    directory = path.rsplit("/", 1)[0]
    mount = mounts[directory]
    assert mount["readOnly"] is True
    secret: str = volumes(docs)[mount["name"]]["secret"]["secretName"]
    return secret


@pytest.mark.parametrize("value_set", ["minimal", "sentinel", "cluster"])
def test_generated_keys_are_one_secret_mounted_in_every_replica(chart: Any, value_set: str) -> None:
    vals = values(value_set) | {"workers": 4}
    docs = render(chart, vals)
    s = settings_doc(docs)
    settings = Settings.model_validate(s)
    # Every replica runs this one pod template; `serve --workers 4` reads this one file.
    assert container(docs)["args"][-2:] == ["--workers", "4"]
    assert settings.crypto.require is True  # a pod without the keys refuses to start
    assert settings.crypto.active_kid == "k1"
    key_files = [
        *settings.crypto.keys.values(),
        settings.stepup.context_key_file,
        *settings.audit.mac_keys.values(),
    ]
    assert all(str(f).startswith(f"{KEYS_DIR}/") for f in key_files)
    assert {mounted_secret(docs, str(f)) for f in key_files} == {KEYS_SECRET}
    (secret,) = [d for d in by_kind(docs)["Secret"] if d["metadata"]["name"] == KEYS_SECRET]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert set(secret["data"]) == {f.name for f in key_files if f is not None}
    for name, data in secret["data"].items():
        content = base64.b64decode(data)  # the file the pod sees
        assert len(parse_key(content, source=name)) == 32  # what authz.store.crypto reads
    # The keys never rotate by accident: the settings checksum does not depend on them.
    again = render(chart, vals)
    annotations = named(again, "Deployment", SERVICE)["spec"]["template"]["metadata"]
    assert (
        annotations["annotations"]["checksum/config"]
        == named(docs, "Deployment", SERVICE)["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]
    )
    assert by_kind(again)["Secret"][0]["data"] != secret["data"]  # offline: no lookup


def test_an_existing_keys_secret_and_a_rotation(chart: Any) -> None:
    vals = values("url")  # keys.existingSecret with two kids, the newer one active
    docs = render(chart, vals)
    assert "Secret" not in by_kind(docs)  # the chart makes none: yours is used
    settings = Settings.model_validate(settings_doc(docs))
    assert (settings.crypto.active_kid, settings.crypto.previous_kid) == ("2026a", "2025b")
    assert {k: str(p) for k, p in settings.crypto.keys.items()} == {
        "2026a": f"{KEYS_DIR}/crypto-2026a",
        "2025b": f"{KEYS_DIR}/crypto-2025b",
    }
    assert mounted_secret(docs, f"{KEYS_DIR}/crypto-2026a") == "stepup-authz-keys"
    bad = copy.deepcopy(vals)
    bad["keys"]["crypto"]["activeKid"] = "2027a"
    with pytest.raises(helm.HelmError, match=r"keys\.crypto\.activeKid"):
        chart.render(bad, name="x", namespace="x")
    for broken in ({"kids": []}, {"kids": ["bad kid"]}, {"activeKid": ""}):
        vals_bad = copy.deepcopy(vals)
        vals_bad["keys"]["crypto"].update(broken)
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(vals_bad)


def test_audit_mac_keys_come_from_the_same_secret(chart: Any) -> None:
    """keys.auditMac: entries audit-mac-<kid> of the keys Secret and the audit settings
    naming them, so every replica MACs with the keys the exporter verifies."""
    vals = values("minimal") | {"keys": {"auditMac": {"kids": ["m1", "m2"], "activeKid": "m1"}}}
    docs = render(chart, vals)
    s = settings_doc(docs)
    audit = s["audit"]
    assert audit["mac_active_kid"] == "m1"
    assert audit["mac_keys"] == {"m1": f"{KEYS_DIR}/audit-mac-m1", "m2": f"{KEYS_DIR}/audit-mac-m2"}
    assert {mounted_secret(docs, p) for p in audit["mac_keys"].values()} == {KEYS_SECRET}
    (secret,) = by_kind(docs)["Secret"]
    assert {"audit-mac-m1", "audit-mac-m2"} <= set(secret["data"])
    Settings.model_validate(s)
    bad = values("minimal") | {"keys": {"auditMac": {"kids": ["m1"], "activeKid": "zz"}}}
    with pytest.raises(helm.HelmError, match=r"keys\.auditMac\.activeKid"):
        chart.render(bad, name="x", namespace="x")


def test_config_is_merged_over_the_rendered_settings(chart: Any) -> None:
    """``config:`` reaches every setting, and false, 0 and lists mean what they say (sprig's
    mergeOverwrite would drop false and 0)."""
    config = {
        "stepup": {"cookie_secure": False, "landing_path": "/home"},
        "grpc": {"shutdown_grace_s": 0},
        "oidc": {"leeway_s": 0, "algorithms": ["ES256"]},
        "redis": {"fast_client": False},
        "devices": {"cookie": None},
        "signals_not_a_setting": None,
    }
    vals = values("minimal") | {"config": config}
    s = settings_doc(render(chart, vals))
    assert s["grpc"]["shutdown_grace_s"] == 0  # config wins over the chart's own value (5)
    assert s["grpc"]["port"] == 9191  # siblings kept
    assert s["stepup"]["cookie_secure"] is False and s["stepup"]["landing_path"] == "/home"
    assert s["stepup"]["public_url"] == "https://trading.example.com"  # siblings kept
    assert s["oidc"]["leeway_s"] == 0 and s["oidc"]["algorithms"] == ["ES256"]
    assert s["oidc"]["issuer"] == values("minimal")["oidc"]["issuer"]
    assert s["redis"]["fast_client"] is False
    # A mistyped or unknown setting is the service's to refuse, at start, with its name.
    with pytest.raises(ValueError, match="signals_not_a_setting"):
        Settings.model_validate(s)
    del s["signals_not_a_setting"]
    settings = Settings.model_validate(s)
    assert settings.devices.cookie is None and settings.oidc.algorithms == ("ES256",)


def test_settings_reachable_from_values(chart: Any) -> None:
    vals = values("minimal") | {
        "workers": 2,
        "httpAuthz": {"enabled": True},
        "proxy": {"xffNumTrustedHops": 1},
        "tls": {"existingSecret": "stepup-authz-tls", "clientCa": True},
    }
    docs = render(chart, vals)
    settings = Settings.model_validate(settings_doc(docs))
    # The hop count is the proxy's; the service takes the address Envoy computed from it.
    assert "network" not in settings_doc(docs) and settings.grpc.peer_header is not None
    assert settings.http_authz.enabled and settings.http_authz.port == 9193
    assert settings.http_authz.host == "0.0.0.0"
    tls = settings.grpc.tls
    assert tls is not None and tls.client_ca_file is not None
    for f in (tls.cert_file, tls.key_file, tls.client_ca_file):
        assert mounted_secret(docs, str(f)) == "stepup-authz-tls"
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 9191, "http": 9192, "http-authz": 9193, "metrics": 9090}
    assert c["startupProbe"] == {
        "httpGet": {"path": "/healthz", "port": "http"},
        "periodSeconds": 2,
        "failureThreshold": 30,
    }
    svc = {p["name"]: p for p in named(docs, "Service", SERVICE)["spec"]["ports"]}
    assert svc["http-authz"]["targetPort"] == "http-authz"
    (proxies, _metrics) = named(docs, "NetworkPolicy", SERVICE)["spec"]["ingress"]
    assert {"port": "http-authz", "protocol": "TCP"} in proxies["ports"]
    for doc in docs:
        if doc["kind"] in ("Deployment", "Service", "NetworkPolicy", "ConfigMap", "Secret"):
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    # Off by default: nothing of the HTTP mode, one process, gRPC health for startup.
    plain = render(chart, values("minimal"))
    assert not Settings.model_validate(settings_doc(plain)).http_authz.enabled
    assert "http-authz" not in {p["name"] for p in container(plain)["ports"]}
    assert "--workers" not in container(plain)["args"]


def test_metrics_have_a_port_of_their_own(chart: Any) -> None:
    """Scrapers reach the metrics port only and the proxies never reach it; metricsPort 0
    puts /metrics back on the HTTP port (the service's own route)."""
    docs = render(chart, values("minimal"))
    settings = Settings.model_validate(settings_doc(docs))
    assert (settings.metrics.host, settings.metrics.port) == ("0.0.0.0", 9090)
    svc = {p["name"]: p for p in named(docs, "Service", SERVICE)["spec"]["ports"]}
    assert svc["metrics"]["targetPort"] == "metrics"
    proxies, scrapers = named(docs, "NetworkPolicy", SERVICE)["spec"]["ingress"]
    assert scrapers["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert "metrics" not in {p["port"] for p in proxies["ports"]}
    shared = render(chart, values("minimal") | {"metricsPort": 0})
    assert Settings.model_validate(settings_doc(shared)).metrics.port is None
    svc = {p["name"]: p for p in named(shared, "Service", SERVICE)["spec"]["ports"]}
    assert svc["metrics"]["targetPort"] == "http"


def test_extra_env_volumes_and_mounts(chart: Any) -> None:
    vals = values("minimal") | {
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy.internal:3128"}],
        "extraVolumes": [{"name": "idp-ca", "configMap": {"name": "corporate-ca"}}],
        "extraVolumeMounts": [{"name": "idp-ca", "mountPath": "/etc/idp-ca", "readOnly": True}],
        "config": {"devices": {"assertion": {"issuer": "mdm", "jwks_file": "/etc/idp-ca/j"}}},
    }
    docs = render(chart, vals)
    c = container(docs)
    assert {"name": "HTTPS_PROXY", "value": "http://proxy.internal:3128"} in c["env"]
    assert {"name": "idp-ca", "mountPath": "/etc/idp-ca", "readOnly": True} in c["volumeMounts"]
    assert volumes(docs)["idp-ca"] == {"name": "idp-ca", "configMap": {"name": "corporate-ca"}}
    settings = Settings.model_validate(settings_doc(docs))
    assert settings.devices.assertion is not None
    kubernetes_validate.validate(
        named(docs, "Deployment", SERVICE), kubernetes_validate.latest_version(), strict=True
    )
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values("minimal") | {"extraEnv": [{"value": "no name"}]})


def test_probes_are_the_documented_endpoints(chart: Any) -> None:
    c = container(render(chart, values("minimal")))
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def _istiod_rules(policy: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in policy["spec"]["egress"] if "to" in r]


def test_network_policies_admit_the_istio_sidecar(chart: Any) -> None:
    off = render(chart, values("minimal"))
    for name in (SERVICE, EXPORTER):
        assert _istiod_rules(named(off, "NetworkPolicy", name)) == []
    docs = render(chart, values("minimal") | {"istio": {"enabled": True}})
    for name in (SERVICE, EXPORTER):
        (rule,) = _istiod_rules(named(docs, "NetworkPolicy", name))
        (peer,) = rule["to"]
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "istio-system"
        }
        assert peer["podSelector"]["matchLabels"] == {"app": "istiod"}
        assert rule["ports"] == [{"port": 15012, "protocol": "TCP"}]
        kubernetes_validate.validate(
            named(docs, "NetworkPolicy", name), kubernetes_validate.latest_version(), strict=True
        )
    _, scrapers = named(docs, "NetworkPolicy", SERVICE)["spec"]["ingress"]
    assert {p["port"] for p in scrapers["ports"]} == {"metrics", 15020, 15090}


def test_schema_refuses_bad_settings_values(chart: Any) -> None:
    for bad in (
        {"workers": 0},
        {"proxy": {"xffNumTrustedHops": 11}},
        {"proxy": {"trustedXffHops": 1}},
        {"httpAuthz": {"enabled": "yes"}},
        {"tls": {"secret": "x"}},
        {"metricsPort": 70000},
        {"config": []},
        {"istio": {"istiodPorts": []}},
        {"secrets": {"encryptionKey": {"existingSecret": "old"}}},  # replaced by keys
    ):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(values("minimal") | bad)


def test_the_trusted_hop_count_is_the_proxys_and_the_old_value_is_refused(chart: Any) -> None:
    """One client address, Envoy's: the chart has no service-side hop count any more. The
    old value is refused naming its replacement (never silently dropped), and a gRPC check
    told to read the connection peer is refused while proxies are trusted (the peer is then
    the last proxy, not the client)."""
    with pytest.raises(helm.HelmError, match=r"proxy\.xffNumTrustedHops"):
        render(chart, values("minimal") | {"network": {"trustedXffHops": 1}})
    peer_null = {"config": {"grpc": {"peer_header": None}}}
    with pytest.raises(helm.HelmError, match=r"grpc\.peer_header"):
        render(chart, values("minimal") | {"proxy": {"xffNumTrustedHops": 1}} | peer_null)
    settings = Settings.model_validate(settings_doc(render(chart, values("minimal") | peer_null)))
    assert settings.grpc.peer_header is None  # no trusted hop: Envoy's peer is the client
    notes = chart.render(values("url"), name="r", namespace="n", is_install=True)
    (text,) = [t for p, t in notes.items() if p.endswith("NOTES.txt")]
    assert "render envoy --xff-num-trusted-hops 1" in text
