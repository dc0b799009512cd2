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
from authz.render import (
    EXT_AUTHZ,
    add_render_parser,
    peer_address_filter,
    render_envoy,
    render_istio,
)
from authz.render.istio import peer_address_envoy_filter
from tests.deploy.chart import ROOT, named, render, values
from tests.deploy.test_envoy_configs import assert_valid, hcm

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


# The client address (docs/threat-model.md, "11. Client address"). Istio's gRPC provider
# does not send x-stepup-peer-address: without the EnvoyFilter every check is refused; with
# a filter that drifted from `render envoy`'s, a client could keep its own copy.


def _envoy_filters(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "EnvoyFilter"]


def _inserted(ef: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """context -> the filter each patch inserts, checking it goes in before ext_authz."""
    out = {}
    for patch in ef["spec"]["configPatches"]:
        assert patch["applyTo"] == "HTTP_FILTER"
        assert patch["patch"]["operation"] == "INSERT_BEFORE"
        chain = patch["match"]["listener"]["filterChain"]["filter"]
        assert chain == {
            "name": "envoy.filters.network.http_connection_manager",
            "subFilter": {"name": EXT_AUTHZ},
        }
        out[patch["match"]["context"]] = patch["patch"]["value"]
    return out


def test_the_peer_address_filter_is_render_envoys_own() -> None:
    (ef,) = list(yaml.safe_load_all((ROOT / "k8s/istio/peer-address.yaml").read_text()))
    assert ef["apiVersion"] == "networking.istio.io/v1alpha3"
    inserted = _inserted(ef)
    assert set(inserted) == {"GATEWAY", "SIDECAR_INBOUND"}
    for value in inserted.values():
        assert value == peer_address_filter()
        (mutation,) = value["typed_config"]["mutations"]["request_mutations"]
        # A client-sent x-stepup-peer-address is replaced, never kept beside Envoy's.
        assert mutation["append"]["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"
    # The same workloads and namespace as the hand-written AuthorizationPolicies.
    aps = list(yaml.safe_load_all((ROOT / "k8s/istio/authorizationpolicy.yaml").read_text()))
    assert {ap["metadata"]["namespace"] for ap in aps} == {ef["metadata"]["namespace"]}
    assert {ap["spec"]["selector"]["matchLabels"]["app"] for ap in aps} == {
        ef["spec"]["workloadSelector"]["labels"]["app"]
    }
    assert ef == peer_address_envoy_filter("trading", {"app": "trading-web"})


def test_render_istio_emits_the_envoy_filter_for_its_workloads(tmp_path: Path) -> None:
    policy = read_policy(EXAMPLE_POLICY).policy
    docs = render_istio(policy, namespace="istio-ingress", selector={"istio": "ingressgateway"})
    (ef,) = _envoy_filters(docs)
    assert ef["metadata"]["namespace"] == "istio-ingress"
    assert ef["spec"]["workloadSelector"] == {"labels": {"istio": "ingressgateway"}}
    assert all(v == peer_address_filter() for v in _inserted(ef).values())
    # --all-workloads: no selector, the whole namespace, as the AuthorizationPolicies.
    (everyone,) = _envoy_filters(render_istio(policy, namespace="trading"))
    assert "workloadSelector" not in everyone["spec"]
    # Through the command line, as docs/deploy.md gives it.
    p = argparse.ArgumentParser()
    add_render_parser(p.add_subparsers(dest="command", required=True))
    out = tmp_path / "istio.yaml"
    args = p.parse_args(
        [
            *("render", "istio", "--policy", str(EXAMPLE_POLICY), "--namespace", "trading"),
            *("--selector", "app=trading-web", "-o", str(out)),
        ]
    )
    assert args.func(args) == 0
    text = out.read_text()
    (ef,) = _envoy_filters(list(yaml.safe_load_all(text)))
    assert ef == peer_address_envoy_filter(
        "trading", {"app": "trading-web"}, ef["metadata"]["labels"]
    )
    assert "&id" not in text


def without_peer_filter(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A `render envoy` config's HTTP filters, minus its own peer filter: the chain as Istio
    or Envoy Gateway builds it, ext_authz without the address in front."""
    filters: list[dict[str, Any]] = hcm(doc)["http_filters"]
    name = peer_address_filter()["name"]
    filters[:] = [f for f in filters if f["name"] != name]
    return filters


def test_real_envoy_accepts_the_patched_chain(tmp_path: Path) -> None:
    """Each patch's value, inserted before ext_authz as Istio does into a chain without it,
    gives back `render envoy`'s own chain, which the real Envoy validates."""
    (ef,) = list(yaml.safe_load_all((ROOT / "k8s/istio/peer-address.yaml").read_text()))
    policy = read_policy(EXAMPLE_POLICY).policy
    for context, value in _inserted(ef).items():
        doc = render_envoy(policy, mode="grpc", hosts=["app.example"])
        filters = without_peer_filter(doc)
        assert [f["name"] for f in filters].count(value["name"]) == 0
        at = next(i for i, f in enumerate(filters) if f["name"] == EXT_AUTHZ)
        filters.insert(at, value)
        assert doc == render_envoy(policy, mode="grpc", hosts=["app.example"])  # as rendered
        out = tmp_path / f"{context}.yaml"
        out.write_text(yaml.safe_dump(doc, sort_keys=False))
        assert_valid(out)
