"""Proxy configuration generated from the policy, so the proxy and the policy cannot drift.

``render_envoy`` builds a complete Envoy bootstrap: one Envoy route per policy route, in
policy order (first match wins in both), each carrying
``check_settings.context_extensions: {stepup_level: <level>}``; ``/_stepup/`` is routed to
the service's HTTP port with ext_authz disabled; everything else falls through to a
catch-all at the policy's ``default_level``. Public levels keep ext_authz ON: the service
allows them itself (and still strips client-sent ``x-stepup-*`` headers and applies deny
rules), so no route ever skips the check except ``/_stepup/``.

Why this is safe when the two copies disagree: the service only lets ``stepup_level`` raise
a request's level, never lower it, and refuses a level it does not know (``unknown-level``).
A stale proxy can therefore make a route stricter, never weaker.

``render_istio`` emits ``AuthorizationPolicy`` objects with ``action: CUSTOM`` (one per
level, plus a catch-all that sends every request but ``/_stepup/*`` to the provider) and a
``VirtualService`` routing ``/_stepup/`` to the service. Istio cannot pass per-route
``context_extensions`` through a CUSTOM provider, so there the service's own policy decides
the level; the per-level objects make the sensitivity visible to mesh operators and keep
each sensitive path checked even if the catch-all is removed.

Plain dicts, serialised with PyYAML: ``envoy --mode validate`` is the schema check (the
tests run it), which typed protobuf classes would only duplicate.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from authz.core.decision import CONTEXT_LEVEL_KEY
from authz.core.policy import Policy, Route

EXT_AUTHZ = "envoy.filters.http.ext_authz"
_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
_HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
_ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    # Without the query: /_stepup/callback carries the one-time code and state.
    "path": "%REQ_WITHOUT_QUERY(:PATH)%",
    "authority": "%REQ(:AUTHORITY)%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "route_name": "%ROUTE_NAME%",
    "decision_id": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision_id)%",
    "outcome": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:outcome)%",
    "reason": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:reason)%",
}


def _domain(host: str) -> str:
    """Policy host (``.example.com`` is the ``*.example.com`` wildcard) -> Envoy domain."""
    return f"*{host}" if host.startswith(".") else host


def _applies(route: Route, vhost: str | None) -> bool:
    """Whether a policy route can match requests that Envoy sends to virtual host ``vhost``.

    ``vhost`` is a policy host (exact or ``.suffix``) or None for the catch-all ``*``.
    Envoy picks exact domains before wildcards and the longest wildcard first, so a request
    for ``a.example.com`` lands in the exact vhost when there is one; that vhost must then
    also carry every wildcard and host-less route that would match it, in policy order.
    """
    if route.host is None:
        return True
    if vhost is None:
        return False
    if route.host == vhost:
        return True
    return route.host.startswith(".") and vhost.endswith(route.host)


def _match(route: Route) -> dict[str, Any]:
    match: dict[str, Any]
    if route.exact is not None:
        match = {"path": route.exact}
    elif route.prefix is not None:
        match = {"prefix": route.prefix}
    elif route.regex is not None:
        # Envoy's safe_regex (RE2) must match the whole path, like the policy's fullmatch.
        match = {"safe_regex": {"regex": route.regex.pattern}}
    else:
        match = {"prefix": "/"}
    if route.methods is not None:
        methods = sorted(route.methods)
        string_match: dict[str, Any] = (
            {"exact": methods[0]}
            if len(methods) == 1
            else {"safe_regex": {"regex": "|".join(re.escape(m) for m in methods)}}
        )
        match["headers"] = [{"name": ":method", "string_match": string_match}]
    return match


def _checked(level: str) -> dict[str, Any]:
    return {
        EXT_AUTHZ: {
            "@type": _PER_ROUTE,
            "check_settings": {"context_extensions": {CONTEXT_LEVEL_KEY: level}},
        }
    }


def _envoy_routes(
    policy: Policy,
    vhost: str | None,
    *,
    upstream_cluster: str,
    stepup_cluster: str,
    path_prefix: str,
    route_timeout: str,
) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = [
        {
            "name": "stepup-endpoints",
            "match": {"prefix": f"{path_prefix}/"},
            "route": {"cluster": stepup_cluster, "timeout": route_timeout},
            # The client address Envoy sees, for a bound level's callback check; it
            # overwrites any client-sent value.
            "request_headers_to_add": [
                {
                    "header": {
                        "key": "x-stepup-peer-address",
                        "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                    },
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
            # Reachable before the user has stepped up; the service authenticates these itself.
            "typed_per_filter_config": {EXT_AUTHZ: {"@type": _PER_ROUTE, "disabled": True}},
        }
    ]
    for r in policy.routes:
        if _applies(r, vhost):
            routes.append(
                {
                    "name": f"policy-{r.index}-{r.level.name}",
                    "match": _match(r),
                    "route": {"cluster": upstream_cluster, "timeout": route_timeout},
                    "typed_per_filter_config": _checked(r.level.name),
                }
            )
    routes.append(
        {
            "name": f"default-{policy.default_level.name}",
            "match": {"prefix": "/"},
            "route": {"cluster": upstream_cluster, "timeout": route_timeout},
            "typed_per_filter_config": _checked(policy.default_level.name),
        }
    )
    return routes


def _vhost_keys(policy: Policy) -> list[str]:
    seen: list[str] = []
    for r in policy.routes:
        if r.host is not None and r.host not in seen:
            seen.append(r.host)
    return seen


def _cluster(name: str, address: tuple[str, int], *, http2: bool = False) -> dict[str, Any]:
    host, port = address
    is_ip = re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+", host) is not None
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if is_ip else "STRICT_DNS",
        "connect_timeout": "0.25s",
        "per_connection_buffer_limit_bytes": 32768,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
        # One Check per request: the default 1024 would turn a burst into fail-closed 403s.
        cluster["circuit_breakers"] = {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": 10000,
                    "max_pending_requests": 10000,
                    "max_requests": 10000,
                }
            ]
        }
    return cluster


TRACING_CLUSTER = "opentelemetry_collector"


@dataclass(frozen=True, slots=True)
class Tracing:
    """Envoy's OpenTelemetry tracer: where to send spans and how many requests to trace.

    ``endpoint`` is the collector's OTLP/HTTP traces URL (``http://collector:4318/v1/traces``;
    a URL without a path gets ``/v1/traces``). ``sample_percent`` is Envoy's head sampling:
    the service follows Envoy's decision (the ``sampled`` flag of ``traceparent``).
    """

    endpoint: str
    service_name: str = "stepup-envoy"
    sample_percent: float = 100.0

    @property
    def url(self) -> str:
        parts = urlsplit(self.endpoint)
        return (
            self.endpoint
            if parts.path not in ("", "/")
            else f"{self.endpoint.rstrip('/')}/v1/traces"
        )

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.endpoint)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"tracing endpoint must be an http:// URL, got {self.endpoint!r}")
        return parts.hostname, parts.port or 4318


def _tracing(t: Tracing) -> dict[str, Any]:
    if not 0 <= t.sample_percent <= 100:
        raise ValueError(f"tracing sample percent must be 0-100, got {t.sample_percent}")
    t.address  # noqa: B018 - validates the endpoint before anything is rendered
    return {
        "random_sampling": {"value": t.sample_percent},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "http_service": {
                    "http_uri": {"uri": t.url, "cluster": TRACING_CLUSTER, "timeout": "1s"}
                },
                "service_name": t.service_name,
            },
        },
    }


def render_envoy(
    policy: Policy,
    *,
    authz_cluster: str = "stepup_authz",
    stepup_cluster: str = "stepup_http",
    upstream_cluster: str = "upstream",
    listen_address: tuple[str, int] = ("0.0.0.0", 8080),
    admin_address: tuple[str, int] = ("127.0.0.1", 9901),
    authz_address: tuple[str, int] = ("127.0.0.1", 9191),
    stepup_address: tuple[str, int] = ("127.0.0.1", 9192),
    upstream_address: tuple[str, int] = ("127.0.0.1", 8000),
    authz_timeout: str = "0.25s",
    route_timeout: str = "15s",
    xff_num_trusted_hops: int = 0,
    path_prefix: str = "/_stepup",
    tracing: Tracing | None = None,
) -> dict[str, Any]:
    """A complete Envoy bootstrap (a dict) enforcing ``policy`` at the edge.

    ``tracing`` turns on Envoy's OpenTelemetry tracer: a span per request, exported as
    OTLP/HTTP to the collector, with the W3C ``traceparent`` propagated to the upstream and
    to the ext_authz call, so the service's Check span joins the same trace.

    ``authz_timeout`` must stay above the service's Redis deadline (``redis.deadline_ms``,
    50 ms by default) so a slow store yields the service's own fail-closed answer (with a
    reason and a decision id) rather than Envoy's bare timeout. ``xff_num_trusted_hops`` is
    0 when Envoy is the edge, 1 behind one load balancer that appends to X-Forwarded-For.
    """
    common = {
        "upstream_cluster": upstream_cluster,
        "stepup_cluster": stepup_cluster,
        "path_prefix": path_prefix.rstrip("/"),
        "route_timeout": route_timeout,
    }
    vhosts = [
        {
            "name": f"host-{host.lstrip('.')}",
            "domains": [_domain(host)],
            "routes": _envoy_routes(policy, host, **common),
        }
        for host in _vhost_keys(policy)
    ]
    vhosts.append(
        {"name": "any-host", "domains": ["*"], "routes": _envoy_routes(policy, None, **common)}
    )
    hcm: dict[str, Any] = {
        "@type": _HCM,
        "stat_prefix": "edge",
        "codec_type": "AUTO",
        # One canonical path for the policy and the upstream (see envoy/edge.yaml).
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "use_remote_address": True,
        # Client certificates reach the step-up endpoints only as Envoy sets them.
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"cert": True},
        "xff_num_trusted_hops": xff_num_trusted_hops,
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
        "request_headers_timeout": "10s",
        "access_log": [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3."
                    "StdoutAccessLog",
                    "log_format": {
                        "json_format": dict(_ACCESS_LOG_FORMAT),
                        "formatters": [
                            {
                                "name": "envoy.formatter.req_without_query",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.formatter."
                                    "req_without_query.v3.ReqWithoutQuery"
                                },
                            }
                        ],
                    },
                },
            }
        ],
        "http_filters": [
            {
                "name": EXT_AUTHZ,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3."
                    "ExtAuthz",
                    "grpc_service": {
                        "envoy_grpc": {"cluster_name": authz_cluster},
                        "timeout": authz_timeout,
                    },
                    "transport_api_version": "V3",
                    "failure_mode_allow": False,
                    "status_on_error": {"code": 403},
                    "include_peer_certificate": True,
                    "clear_route_cache": False,
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
        **({"tracing": _tracing(tracing)} if tracing is not None else {}),
        "route_config": {
            "name": "stepup-policy",
            # Policy hosts carry no port; match "host:8443" to "host" as well.
            "ignore_port_in_host_matching": True,
            "virtual_hosts": vhosts,
        },
    }
    return {
        "admin": {
            "address": {
                "socket_address": {"address": admin_address[0], "port_value": admin_address[1]}
            }
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 10000,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": {
                        "socket_address": {
                            "address": listen_address[0],
                            "port_value": listen_address[1],
                        }
                    },
                    "per_connection_buffer_limit_bytes": 32768,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                _cluster(authz_cluster, authz_address, http2=True),
                _cluster(stepup_cluster, stepup_address),
                _cluster(upstream_cluster, upstream_address),
                *([_cluster(TRACING_CLUSTER, tracing.address)] if tracing is not None else []),
            ],
        },
    }


# -- Istio -----------------------------------------------------------------------------------


def _istio_operation(route: Route) -> dict[str, Any] | None:
    """An AuthorizationPolicy ``operation`` for ``route``, or None for a regex route (Istio
    paths are exact, ``prefix*`` or ``*suffix`` only: the catch-all covers those)."""
    op: dict[str, Any] = {}
    if route.exact is not None:
        op["paths"] = [route.exact]
    elif route.prefix is not None:
        op["paths"] = [f"{route.prefix}*"]
    elif route.regex is not None:
        return None
    if route.host is not None:
        op["hosts"] = [_domain(route.host)]
    if route.methods is not None:
        op["methods"] = sorted(route.methods)
    return op


def render_istio(
    policy: Policy,
    *,
    namespace: str,
    provider_name: str = "stepup-authz",
    selector: Mapping[str, str] | None = None,
    service_host: str | None = None,
    http_port: int = 9192,
    gateways: Sequence[str] = ("istio-ingress/gateway",),
    hosts: Sequence[str] | None = None,
    path_prefix: str = "/_stepup",
) -> list[dict[str, Any]]:
    """Istio objects for ``policy``: CUSTOM AuthorizationPolicies and the /_stepup/ route.

    ``selector`` picks the workloads (an ingress gateway, or application pods with
    sidecars); ``provider_name`` must match a ``meshConfig.extensionProviders`` entry
    (k8s/istio/meshconfig.yaml). ``hosts`` defaults to the policy's exact hosts, else ``*``.
    """
    prefix = path_prefix.rstrip("/")
    service_host = service_host or f"stepup-authz.{namespace}.svc.cluster.local"
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
        ops = [
            op for r in policy.routes if r.level is level if (op := _istio_operation(r)) is not None
        ]
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
    vs_hosts = (
        list(hosts) if hosts else [h for h in _vhost_keys(policy) if not h.startswith(".")] or ["*"]
    )
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
                            {"destination": {"host": service_host, "port": {"number": http_port}}}
                        ],
                        "timeout": "15s",
                    }
                ],
            },
        }
    )
    return docs


# -- CLI -------------------------------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _otlp_url(text: str) -> str:
    try:
        Tracing(text).address  # noqa: B018 - validation only
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage, got {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected 0-100, got {text!r}")
    return value


def _cmd_render(args: argparse.Namespace) -> int:
    from authz.config.policy_file import read_policy
    from authz.errors import ConfigError

    try:
        policy = read_policy(args.policy).policy
    except ConfigError as exc:
        print(f"stepup-authz render: invalid policy: {exc}", file=sys.stderr)
        return 2
    if args.target == "envoy":
        tracing = None
        if args.tracing_otlp is not None:
            tracing = Tracing(
                args.tracing_otlp,
                service_name=args.tracing_service_name,
                sample_percent=args.tracing_sample_percent,
            )
        text = yaml.safe_dump(
            render_envoy(
                policy,
                listen_address=args.listen,
                admin_address=args.admin,
                authz_address=args.authz,
                stepup_address=args.stepup,
                upstream_address=args.upstream,
                authz_timeout=args.authz_timeout,
                xff_num_trusted_hops=args.xff_num_trusted_hops,
                tracing=tracing,
            ),
            sort_keys=False,
        )
    else:
        if not args.selector and not args.all_workloads:
            print(
                "stepup-authz render istio: say which workloads the policies apply to: "
                "--selector KEY=VALUE (repeatable),\n"
                f"  or --all-workloads for every workload in namespace {args.namespace}",
                file=sys.stderr,
            )
            return 2
        text = yaml.safe_dump_all(
            render_istio(
                policy,
                namespace=args.namespace,
                provider_name=args.provider,
                selector=dict(args.selector) or None,
                gateways=args.gateway or ["istio-ingress/gateway"],
                hosts=args.host or None,
            ),
            sort_keys=False,
        )
    header = (
        f"# Generated by `stepup-authz render {args.target}` from {args.policy}; do not edit.\n"
    )
    if args.output is None:
        sys.stdout.write(header + text)
    else:
        try:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(header + text)
        except OSError as exc:
            print(
                f"stepup-authz render: cannot write {args.output}: {exc.strerror}", file=sys.stderr
            )
            return 2
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, type=Path, help="policy YAML file")
    p.add_argument("--output", "-o", type=Path, help="write here instead of stdout")
    p.set_defaults(func=_cmd_render)


def add_render_parser(subparsers: Any) -> None:
    """Register ``render envoy|istio --policy FILE [--output FILE] ...`` and its ``func``."""
    p = subparsers.add_parser(
        "render", help="generate Envoy or Istio configuration from a policy file"
    )
    targets = p.add_subparsers(dest="target", required=True, metavar="{envoy,istio}")
    env = targets.add_parser("envoy", help="a complete Envoy bootstrap enforcing the policy")
    _common(env)
    env.add_argument("--listen", type=_address, default=("0.0.0.0", 8080), metavar="HOST:PORT")
    env.add_argument("--admin", type=_address, default=("127.0.0.1", 9901), metavar="HOST:PORT")
    env.add_argument(
        "--authz",
        type=_address,
        default=("127.0.0.1", 9191),
        metavar="HOST:PORT",
        help="the service's gRPC ext_authz address",
    )
    env.add_argument(
        "--stepup",
        type=_address,
        default=("127.0.0.1", 9192),
        metavar="HOST:PORT",
        help="the service's HTTP address (/_stepup/*)",
    )
    env.add_argument(
        "--upstream",
        type=_address,
        default=("127.0.0.1", 8000),
        metavar="HOST:PORT",
        help="the protected application",
    )
    env.add_argument(
        "--authz-timeout",
        default="0.25s",
        help="ext_authz deadline; keep it above redis.deadline_ms (50 ms)",
    )
    env.add_argument(
        "--xff-num-trusted-hops",
        type=int,
        default=0,
        help="0 at the edge; 1 behind one load balancer",
    )
    env.add_argument(
        "--tracing-otlp",
        type=_otlp_url,
        metavar="URL",
        help="turn on OpenTelemetry tracing: the collector's OTLP/HTTP URL "
        "(http://collector:4318/v1/traces)",
    )
    env.add_argument("--tracing-service-name", default="stepup-envoy", metavar="NAME")
    env.add_argument(
        "--tracing-sample-percent",
        type=_percent,
        default=100.0,
        metavar="PCT",
        help="requests traced, 0-100 (default 100; lower it for busy production edges)",
    )
    ist = targets.add_parser(
        "istio", help="CUSTOM AuthorizationPolicies and the /_stepup/ VirtualService"
    )
    _common(ist)
    ist.add_argument("--namespace", required=True, help="the namespace of the workloads to protect")
    ist.add_argument(
        "--provider", default="stepup-authz", help="meshConfig.extensionProviders name"
    )
    ist.add_argument(
        "--selector",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="workload label (repeatable); required unless --all-workloads",
    )
    ist.add_argument(
        "--all-workloads",
        action="store_true",
        help="apply to every workload in the namespace (no selector), on purpose",
    )
    ist.add_argument("--gateway", action="append", help="VirtualService gateway (repeatable)")
    ist.add_argument("--host", action="append", help="VirtualService host (repeatable)")
