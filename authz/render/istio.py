"""``render istio``: ``AuthorizationPolicy`` objects (``action: CUSTOM``), the
``/_stepup/`` VirtualService and the peer-address EnvoyFilter for a policy.

One AuthorizationPolicy per level, plus a catch-all that sends every request but
``/_stepup/*`` to the provider. Istio cannot pass per-route ``context_extensions`` through a
CUSTOM provider, so there the service's own policy decides the level; the per-level objects
make the sensitivity visible to mesh operators and keep each sensitive path checked even if
the catch-all is removed.

The objects live in the workloads' namespace (``namespace``); the VirtualService routes
``/_stepup/`` to the service in *its* namespace (``service_namespace``, the chart's release
namespace), which is usually another one.

Istio's gRPC provider does not send the client address the service reads
(``x-stepup-peer-address``): the EnvoyFilter inserts ``render envoy``'s own header_mutation
filter in front of ext_authz, for the same workloads as the AuthorizationPolicies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from authz.core.policy import Policy, Route
from authz.render.envoy import EXT_AUTHZ, _domain, peer_address_filter

DEFAULT_SERVICE_NAME = "stepup-authz"  # the chart's Service for release "stepup-authz"


def _operation(route: Route) -> dict[str, Any] | None:
    """An AuthorizationPolicy ``operation`` for ``route``, or None for a regex route (Istio
    paths are exact, ``prefix*`` or ``*suffix`` only: the catch-all covers those)."""
    op: dict[str, Any] = {}
    if route.exact is not None:
        op["paths"] = [route.exact]
    elif route.prefix is not None:
        # "/wires/*" does not match "/wires": list the bare segment too (as render envoy
        # covers it), stricter never weaker.
        bare = route.prefix.rstrip("/")
        op["paths"] = [f"{route.prefix}*", *([bare] if bare and bare != route.prefix else [])]
    elif route.regex is not None:
        return None
    if route.host is not None:
        op["hosts"] = [_domain(route.host)]
    if route.methods is not None:
        op["methods"] = sorted(route.methods)
    return op


def service_host(name: str, namespace: str, cluster_domain: str = "cluster.local") -> str:
    """The in-cluster DNS name of a Service."""
    return f"{name}.{namespace}.svc.{cluster_domain}"


def peer_address_envoy_filter(
    namespace: str,
    selector: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """An EnvoyFilter inserting :func:`peer_address_filter` before ext_authz, at an ingress
    gateway (GATEWAY) and at a sidecar's inbound listeners (SIDECAR_INBOUND). Without it
    every check behind Istio is refused (the header is missing). It must sit in the
    workloads' namespace, as the AuthorizationPolicies: Istio applies a namespaced
    EnvoyFilter only to workloads of that namespace (the root namespace: to all)."""
    hcm = "envoy.filters.network.http_connection_manager"
    spec: dict[str, Any] = {
        "configPatches": [
            {
                "applyTo": "HTTP_FILTER",
                "match": {
                    "context": context,
                    # A fresh dict each time: no YAML anchors in the output.
                    "listener": {
                        "filterChain": {"filter": {"name": hcm, "subFilter": {"name": EXT_AUTHZ}}}
                    },
                },
                "patch": {"operation": "INSERT_BEFORE", "value": peer_address_filter()},
            }
            for context in ("GATEWAY", "SIDECAR_INBOUND")
        ]
    }
    if selector:
        spec = {"workloadSelector": {"labels": dict(selector)}, **spec}
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {
            "name": "stepup-peer-address",
            "namespace": namespace,
            **({"labels": dict(labels)} if labels else {}),
        },
        "spec": spec,
    }


def render_istio(
    policy: Policy,
    *,
    namespace: str,
    service_namespace: str | None = None,
    service_name: str = DEFAULT_SERVICE_NAME,
    provider_name: str = "stepup-authz",
    selector: Mapping[str, str] | None = None,
    http_port: int = 9192,
    gateways: Sequence[str] = ("istio-ingress/gateway",),
    hosts: Sequence[str] | None = None,
    path_prefix: str = "/_stepup",
) -> list[dict[str, Any]]:
    """Istio objects for ``policy``: CUSTOM AuthorizationPolicies, the /_stepup/ route and
    the peer-address EnvoyFilter (:func:`peer_address_envoy_filter`).

    ``namespace`` is the protected workloads' (the AuthorizationPolicies and the
    VirtualService go there); ``service_namespace`` the service's own (default: the same).
    ``selector`` picks the workloads (an ingress gateway, or application pods with
    sidecars); ``provider_name`` must match a ``meshConfig.extensionProviders`` entry
    (k8s/istio/meshconfig.yaml). ``hosts`` defaults to the policy's exact hosts, else ``*``.
    """
    prefix = path_prefix.rstrip("/")
    destination = service_host(service_name, service_namespace or namespace)
    labels = {
        "app.kubernetes.io/managed-by": "stepup-authz-render",
        "app.kubernetes.io/part-of": "stepup-authz",
    }
    base_spec: dict[str, Any] = {"action": "CUSTOM", "provider": {"name": provider_name}}
    if selector:
        base_spec["selector"] = {"matchLabels": dict(selector)}
    not_stepup = [f"{prefix}/*"]
    docs: list[dict[str, Any]] = []
    for level in policy.levels:
        ops = [op for r in policy.routes if r.level is level if (op := _operation(r)) is not None]
        if not ops:
            continue
        docs.append(
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {
                    "name": f"stepup-{level.name}",
                    "namespace": namespace,
                    "labels": {**labels, "stepup-authz/level": level.name},
                },
                "spec": {
                    **base_spec,
                    "rules": [
                        {"to": [{"operation": {**op, "notPaths": list(not_stepup)}}]} for op in ops
                    ],
                },
            }
        )
    # Everything else (regex routes, the default level, public paths) is checked too: the
    # service decides; only the step-up endpoints themselves bypass the check.
    docs.append(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {
                "name": "stepup-all",
                "namespace": namespace,
                "labels": {**labels, "stepup-authz/level": policy.default_level.name},
            },
            "spec": {
                **base_spec,
                "rules": [{"to": [{"operation": {"notPaths": list(not_stepup)}}]}],
            },
        }
    )
    policy_hosts = [r.host for r in policy.routes if r.host is not None]
    exact = list(dict.fromkeys(h for h in policy_hosts if not h.startswith(".")))
    vs_hosts = list(hosts) if hosts else exact or ["*"]
    docs.append(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "stepup-endpoints", "namespace": namespace, "labels": labels},
            "spec": {
                "hosts": vs_hosts,
                "gateways": list(gateways),
                "http": [
                    {
                        "name": "stepup-endpoints",
                        "match": [{"uri": {"prefix": f"{prefix}/"}}],
                        "route": [
                            {"destination": {"host": destination, "port": {"number": http_port}}}
                        ],
                        "timeout": "15s",
                    }
                ],
            },
        }
    )
    docs.append(peer_address_envoy_filter(namespace, selector, labels))
    return docs
