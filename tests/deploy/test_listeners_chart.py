"""The chart and the service's own metrics listener: the settings it renders start the
listener (``metrics.port``), the Service and an Istio sidecar's metrics merging point at
that port, never at the step-up port."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from authz.config.settings import Settings
from tests.deploy.chart import SERVICE, named, render, values

pytestmark = pytest.mark.deploy


def _pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    template: dict[str, Any] = named(docs, "Deployment", SERVICE)["spec"]["template"]
    return template


def _settings(docs: list[dict[str, Any]]) -> Settings:
    doc = yaml.safe_load(named(docs, "ConfigMap", f"{SERVICE}-config")["data"]["config.yaml"])
    return Settings.model_validate(doc)


def test_istio_metrics_merging_scrapes_the_metrics_port(chart: Any) -> None:
    istio = values("minimal") | {"istio": {"enabled": True}}
    docs = render(chart, istio)
    annotations = _pod(docs)["metadata"]["annotations"]
    port = _settings(docs).metrics.port
    assert port == 9090
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    (c,) = _pod(docs)["spec"]["containers"]
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in c["ports"]
    # Without Istio nothing asks to be scraped this way; with metricsPort 0 neither (then
    # /metrics is on the HTTP port and Istio's merging would scrape the step-up port).
    for vals in (values("minimal"), istio | {"metricsPort": 0}):
        meta = _pod(render(chart, vals))["metadata"]
        assert "prometheus.io/port" not in meta.get("annotations", {})


def test_tls_on_the_http_ext_authz_port(chart: Any) -> None:
    """``tls.httpAuthz`` puts the gRPC port's certificate (and client CA) on the HTTP
    ext_authz port, the files the pod mounts from ``tls.existingSecret``."""
    tls = {"existingSecret": "stepup-authz-tls", "clientCa": True, "httpAuthz": True}
    docs = render(chart, values("minimal") | {"httpAuthz": {"enabled": True}, "tls": tls})
    s = _settings(docs)
    assert s.http_authz.enabled and s.http_authz.tls == s.grpc.tls
    assert s.http_authz.tls is not None
    assert str(s.http_authz.tls.client_ca_file) == "/etc/stepup-authz/secrets/tls/ca.crt"
    (c,) = _pod(docs)["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["tls"] == "/etc/stepup-authz/secrets/tls"
    plain = _settings(render(chart, values("minimal") | {"tls": tls | {"httpAuthz": False}}))
    assert plain.http_authz.tls is None and plain.grpc.tls is not None
