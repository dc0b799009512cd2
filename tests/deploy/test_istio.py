"""Istio from the docs alone (issue 14, item 8): what ``render istio`` and k8s/istio point at
is the Service the chart creates, in the namespace the chart is installed in.

The operator's story: the chart goes into its own namespace, the protected workloads live in
another; following docs/deploy.md must route ``/_stepup/`` to the chart's Service (a 503
otherwise: the host would not exist) and register the provider at the same address.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.config.policy_file import read_policy
from authz.render import add_render_parser, render_istio
from tests.deploy.chart import ROOT, named, render, values

pytestmark = pytest.mark.deploy

EXAMPLE_POLICY = ROOT / "examples" / "policy.yaml"


def _chart_service(chart: Any, release: str, namespace: str) -> tuple[str, int, int, str]:
    """(Service name, its http port, its grpc port, the NOTES' /_stepup/ line)."""
    out = chart.render(values("minimal"), name=release, namespace=namespace, is_install=True)
    docs = [d for p, t in out.items() if p.endswith(".yaml") for d in yaml.safe_load_all(t) if d]
    (svc,) = [
        d for d in docs if d["kind"] == "Service" and "audit-exporter" not in d["metadata"]["name"]
    ]
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    notes = next(t for p, t in out.items() if p.endswith("NOTES.txt"))
    line = next(x for x in notes.splitlines() if x.startswith("/_stepup/*"))
    return svc["metadata"]["name"], ports["http"], ports["grpc"], line


def _destination(docs: list[dict[str, Any]]) -> tuple[str, int]:
    (vs,) = [d for d in docs if d["kind"] == "VirtualService"]
    (http,) = vs["spec"]["http"]
    dest = http["route"][0]["destination"]
    return dest["host"], dest["port"]["number"]


@pytest.mark.parametrize(
    ("release", "namespace"),
    [("stepup-authz", "stepup-authz"), ("authz", "security"), ("edge-stepup-authz", "mesh-auth")],
)
def test_stepup_route_points_at_the_charts_service(
    chart: Any, release: str, namespace: str, tmp_path: Path
) -> None:
    name, http_port, _, notes = _chart_service(chart, release, namespace)
    policy = read_policy(EXAMPLE_POLICY).policy
    docs = render_istio(
        policy,
        namespace="trading",
        service_namespace=namespace,
        service_name=name,
        http_port=http_port,
    )
    host, port = _destination(docs)
    assert host == f"{name}.{namespace}.svc.cluster.local"
    assert notes.endswith(f"{host}:{port}")  # what `helm install` printed
    for d in docs:
        assert d["metadata"]["namespace"] == "trading"  # the workloads' namespace
    # The same through the command line, as docs/deploy.md gives it.
    p = argparse.ArgumentParser()
    add_render_parser(p.add_subparsers(dest="command", required=True))
    out = tmp_path / "istio.yaml"
    args = p.parse_args(
        [
            "render",
            "istio",
            "--policy",
            str(EXAMPLE_POLICY),
            "--namespace",
            "trading",
            "--service-namespace",
            namespace,
            "--service-name",
            name,
            "--selector",
            "app=trading-web",
            "-o",
            str(out),
        ]
    )
    assert args.func(args) == 0
    assert _destination(list(yaml.safe_load_all(out.read_text()))) == (host, port)


def _mesh_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    operator = yaml.safe_load((ROOT / "k8s/istio/meshconfig.yaml").read_text())
    helm_values = yaml.safe_load((ROOT / "k8s/istio/istiod-values.yaml").read_text())
    return operator["spec"]["meshConfig"], helm_values["meshConfig"]


def test_istiod_helm_values_are_the_same_mesh_config() -> None:
    operator, helm_values = _mesh_configs()
    assert operator == helm_values


def test_the_provider_is_the_default_releases_service(chart: Any) -> None:
    name, _, grpc_port, _ = _chart_service(chart, "stepup-authz", "stepup-authz")
    for mesh in _mesh_configs():
        (provider,) = mesh["extensionProviders"]
        grpc = provider["envoyExtAuthzGrpc"]
        assert grpc["service"] == f"{name}.stepup-authz.svc.cluster.local"
        assert grpc["port"] == grpc_port
        assert grpc["failOpen"] is False
        # The gateway's trusted hops and the chart's default agree.
        hops = mesh["defaultConfig"]["gatewayTopology"]["numTrustedProxies"]
        assert (
            hops
            == yaml.safe_load((ROOT / "k8s/stepup-authz/values.yaml").read_text())["proxy"][
                "xffNumTrustedHops"
            ]
        )


def test_the_static_virtual_service_example_points_at_the_chart(chart: Any) -> None:
    name, http_port, _, _ = _chart_service(chart, "stepup-authz", "stepup-authz")
    (vs,) = yaml.safe_load_all((ROOT / "k8s/istio/virtualservice.yaml").read_text())
    dest = vs["spec"]["http"][0]["route"][0]["destination"]
    assert dest == {
        "host": f"{name}.stepup-authz.svc.cluster.local",
        "port": {"number": http_port},
    }
    assert named(render(chart, values("minimal")), "Service", name)
