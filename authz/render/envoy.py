"""``render envoy``: a complete Envoy bootstrap enforcing a policy, in either ext_authz mode.

One virtual host per host Envoy serves: the hosts the policy names plus those given on the
command line, and nothing else. A request for any other host (in ``Host``, HTTP/2
``:authority`` or an absolute request target, which Envoy all reads as ``:authority``)
matches no virtual host and gets Envoy's 404: there is no catch-all to the upstream, so a
foreign host cannot reach a host-scoped route's upstream at the default level. ``*`` serves
every host and is refused when the policy has host-scoped routes, for that reason.

In each virtual host: ``/_stepup/`` to the service's HTTP port with ext_authz off, then one
Envoy route per policy route that can match there, in policy order (first match wins in
both), then ``/`` at the policy's ``default_level``. Every route but ``/_stepup/`` is
checked, public levels too (the service strips client-sent ``x-stepup-*`` and applies deny
rules). Each route carries its level: ``context_extensions: {stepup_level: <level>}`` in
the gRPC mode, the check path ``<prefix>@<level>`` in the HTTP mode
(``authz/check/request.py``). The service only lets that level raise a request's level,
never lower it, and refuses a level it does not know, so a stale proxy errs strict.

Envoy and the service read the host the same way: lower case (Envoy matches domains
case-insensitively), without the port (``ignore_port_in_host_matching``) and without one
trailing dot (``strip_trailing_host_dot``, applied before ext_authz, so the service sees the
host Envoy routed on).

Plain dicts, serialised with PyYAML: ``envoy --mode validate`` is the schema check (the
tests run it), which typed protobuf classes would only duplicate.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from authz.core.decision import CONTEXT_LEVEL_KEY
from authz.core.policy import Level, Policy, Route
from authz.errors import ConfigError
from authz.render import contract

Address = tuple[str, int]
Mode = Literal["grpc", "http"]
ANY_HOST = "*"

EXT_AUTHZ = "envoy.filters.http.ext_authz"
_TYPES = "type.googleapis.com/envoy.extensions."
_PER_ROUTE = _TYPES + "filters.http.ext_authz.v3.ExtAuthzPerRoute"
_HCM = _TYPES + "filters.network.http_connection_manager.v3.HttpConnectionManager"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HOST = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


@dataclass(frozen=True)
class ServiceTls:
    """TLS from Envoy to the service: verify its certificate against ``ca_file`` and the
    name ``sni`` (a DNS SAN); present ``cert_file``/``key_file`` when the service requires
    client certificates (``grpc.tls.client_ca_file``). ``stepup`` also puts the
    ``/_stepup/`` cluster (the service's HTTP port) on TLS."""

    ca_file: str
    sni: str
    cert_file: str | None = None
    key_file: str | None = None
    stepup: bool = True

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("service TLS: give both a client certificate and its key, or neither")
        if not self.sni:
            raise ConfigError("service TLS: the service's certificate name (sni) is required")


def _access_log(mode: Mode) -> list[dict[str, Any]]:
    # In the HTTP mode the metadata keys are the answer's header names
    # (authorization_response.dynamic_metadata_from_headers).
    key = {"grpc": ("decision_id", "outcome", "reason"), "http": contract.METADATA_FROM_HEADERS}
    decision_id, outcome, reason = key[mode][:3]
    meta = "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:{})%"
    fmt = {
        "start_time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        # Without the query: /_stepup/callback carries the one-time code and state.
        "path": "%REQ_WITHOUT_QUERY(:PATH)%",
        "authority": "%REQ(:AUTHORITY)%",
        "response_code": "%RESPONSE_CODE%",
        "response_flags": "%RESPONSE_FLAGS%",
        "response_code_details": "%RESPONSE_CODE_DETAILS%",
        "duration_ms": "%DURATION%",
        "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "route_name": "%ROUTE_NAME%",
        "upstream_host": "%UPSTREAM_HOST%",
        # Joins this line to the service's audit record and the client's x-stepup-decision-id.
        "decision_id": meta.format(decision_id),
        "outcome": meta.format(outcome),
        "reason": meta.format(reason),
    }
    return [
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": _TYPES + "access_loggers.stream.v3.StdoutAccessLog",
                "log_format": {
                    "json_format": fmt,
                    "formatters": [
                        {
                            "name": "envoy.formatter.req_without_query",
                            "typed_config": {
                                "@type": _TYPES + "formatter.req_without_query.v3.ReqWithoutQuery"
                            },
                        }
                    ],
                },
            },
        }
    ]


# -- hosts -----------------------------------------------------------------------------------


def _policy_host(text: str) -> str:
    """A host as the policy writes it (``.example.com`` for ``*.example.com``), or ``*``."""
    host = text.strip().lower().rstrip(".")
    if host == ANY_HOST:
        return host
    if _HOST.fullmatch(host) is None:
        raise ConfigError(f"invalid host {text!r}: a DNS name, *.suffix or *", location="--host")
    return host[1:] if host.startswith("*.") else host


def served_hosts(policy: Policy, extra: Sequence[str] = ()) -> list[str]:
    """The hosts Envoy routes: the policy's, in policy order, then ``extra``; no duplicates.

    Raises ConfigError when there are none (nothing would be served) and for ``*`` beside
    host-scoped routes (a foreign host would bypass them at the default level).
    """
    hosts: list[str] = []
    for r in policy.routes:
        if r.host is not None and r.host not in hosts:
            hosts.append(r.host)
    scoped = bool(hosts)
    for text in extra:
        host = _policy_host(text)
        if host not in hosts:
            hosts.append(host)
    if not hosts:
        raise ConfigError(
            "the policy names no host: give each host Envoy serves with --host "
            "(or --host '*' for every host)",
            location="--host",
        )
    if ANY_HOST in hosts and scoped:
        raise ConfigError(
            "--host '*' with host-scoped routes would let any other host reach the upstream "
            "past them at the default level; name the hosts instead",
            location="--host",
        )
    return hosts


def _domain(host: str) -> str:
    """Policy host (``.example.com`` is the ``*.example.com`` wildcard) -> Envoy domain."""
    return f"*{host}" if host.startswith(".") else host


def _applies(route: Route, vhost: str) -> bool:
    """Whether a policy route can match requests that Envoy sends to virtual host ``vhost``.

    Envoy picks an exact domain before wildcards and the longest wildcard first, so a
    request for ``a.example.com`` lands in the exact virtual host when there is one; that
    one must then also carry every wildcard and host-less route that would match it, in
    policy order. ``*`` exists only when no route is host-scoped.
    """
    if route.host is None or route.host == vhost:
        return True
    return route.host.startswith(".") and vhost.endswith(route.host)


# -- routes ----------------------------------------------------------------------------------


def _match(route: Route) -> dict[str, Any]:
    match: dict[str, Any]
    if route.exact is not None:
        match = {"path": route.exact}
    elif route.prefix is not None and route.prefix != "/" and route.prefix.endswith("/"):
        # "/wires/" also covers the bare "/wires" here (not "/wiresx"): the level can only
        # raise a request's level, so covering more on Envoy's side is never weaker.
        match = {"path_separated_prefix": route.prefix.rstrip("/")}
    elif route.prefix is not None:
        match = {"prefix": route.prefix}
    elif route.regex is not None:
        # Envoy's safe_regex (RE2) matches the whole path, like the policy's fullmatch.
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


@dataclass(frozen=True)
class _Checks:
    """How a route carries its level to the check, per mode."""

    mode: Mode
    http_service: dict[str, Any] | None = None  # the HTTP mode's filter-level http_service

    def level(self, level: str, body_bytes: int | None = None) -> dict[str, Any]:
        if self.mode == "grpc":
            settings: dict[str, Any] = {"context_extensions": {CONTEXT_LEVEL_KEY: level}}
            if body_bytes is not None:
                # A transaction-bound level's digest covers the body: Envoy buffers it (up
                # to the level's max_body_bytes; larger is 413, never a partial body) and
                # sends the exact bytes (raw_body).
                settings["with_request_body"] = {
                    "max_request_bytes": body_bytes,
                    "allow_partial_message": False,
                    "pack_as_bytes": True,
                }
        else:
            assert self.http_service is not None
            # check_settings.http_service replaces the whole filter-level one for this
            # route: the same server, headers and answer lists, the level in the prefix.
            service = dict(self.http_service)
            service["path_prefix"] = f"{service['path_prefix']}@{level}"
            settings = {"http_service": service}
        return {EXT_AUTHZ: {"@type": _PER_ROUTE, "check_settings": settings}}


def _body_bytes(level: Level) -> int | None:
    """How much body Envoy buffers for the Check of a route at ``level``: only a
    transaction-bound level's (the HTTP mode's listener reads no body: there the digest
    binds method, host and path, and a ``require_body`` level refuses)."""
    return level.transaction.max_body_bytes if level.transaction is not None else None


def _routes(
    policy: Policy,
    vhost: str,
    checks: _Checks,
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
                    "typed_per_filter_config": checks.level(r.level.name, _body_bytes(r.level)),
                }
            )
    routes.append(
        {
            "name": f"default-{policy.default_level.name}",
            "match": {"prefix": "/"},
            "route": {"cluster": upstream_cluster, "timeout": route_timeout},
            "typed_per_filter_config": checks.level(
                policy.default_level.name, _body_bytes(policy.default_level)
            ),
        }
    )
    return routes


# -- tracing ---------------------------------------------------------------------------------

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
        if parts.path not in ("", "/"):
            return self.endpoint
        return f"{self.endpoint.rstrip('/')}/v1/traces"

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


# -- clusters --------------------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _endpoints(addresses: Address | Sequence[Address]) -> list[Address]:
    """One ``(host, port)`` or several (replicas)."""
    if len(addresses) == 2 and isinstance(addresses[1], int):
        return [(str(addresses[0]), addresses[1])]
    found = [(str(h), int(p)) for h, p in cast(Sequence[Address], addresses)]
    if not found:
        raise ConfigError("a cluster needs at least one endpoint")
    return found


def _tls_socket(tls: ServiceTls, alpn: str) -> dict[str, Any]:
    common: dict[str, Any] = {
        "alpn_protocols": [alpn],
        "validation_context": {
            "trusted_ca": {"filename": tls.ca_file},
            # The service's certificate must name it: a CA-signed certificate of any other
            # mesh workload is refused.
            "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": tls.sni}}],
        },
    }
    if tls.cert_file is not None:
        common["tls_certificates"] = [
            {
                "certificate_chain": {"filename": tls.cert_file},
                "private_key": {"filename": tls.key_file},
            }
        ]
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TYPES + "transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": tls.sni,
            "common_tls_context": common,
        },
    }


def _cluster(
    name: str,
    addresses: Sequence[Address],
    *,
    protocol: Literal["http1", "http2"] | None = None,
    tls: ServiceTls | None = None,
    grpc_health: bool = False,
) -> dict[str, Any]:
    static = all(_is_ip(h) for h, _ in addresses)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if static else "STRICT_DNS",
        "connect_timeout": "0.25s",
        "per_connection_buffer_limit_bytes": 32768,
        # Several endpoints (replicas): each request goes to the next one.
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": h, "port_value": p}}
                            }
                        }
                        for h, p in addresses
                    ]
                }
            ],
        },
    }
    if not static:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if protocol is not None:
        options: dict[str, Any] = {"@type": "type.googleapis.com/" + _HTTP_OPTIONS}
        if protocol == "http2":
            options["explicit_http_config"] = {"http2_protocol_options": {}}
        else:
            # Envoy closes idle connections first (60 s, below the service's
            # http_authz.idle_timeout_s of 300 s), so it never reuses one the service closes.
            options["common_http_protocol_options"] = {"idle_timeout": "60s"}
            options["explicit_http_config"] = {"http_protocol_options": {}}
        cluster["typed_extension_protocol_options"] = {_HTTP_OPTIONS: options}
        # One check per request: the default 1024 would turn a burst into fail-closed 403s.
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
    if grpc_health:
        # A draining replica (SIGTERM: NOT_SERVING) leaves the rotation before it stops, and
        # one that is back (or started after Envoy) joins within a second or two: the
        # default no-traffic interval would leave it out for a minute.
        cluster["health_checks"] = [
            {
                "timeout": "1s",
                "interval": "5s",
                "no_traffic_interval": "5s",
                "unhealthy_interval": "1s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": contract.GRPC_HEALTH_SERVICE},
            }
        ]
    if tls is not None:
        cluster["transport_socket"] = _tls_socket(tls, "h2" if protocol == "http2" else "http/1.1")
    return cluster


# -- the bootstrap ---------------------------------------------------------------------------


def _grpc_filter(cluster: str, timeout: str) -> dict[str, Any]:
    return {
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": timeout},
        "transport_api_version": "V3",
        "include_peer_certificate": True,
    }


def _http_service(
    cluster: str, address: Address, timeout: str, check_prefix: str, *, tls: bool
) -> dict[str, Any]:
    host, port = address
    authority = f"[{host}]" if ":" in host else host
    return {
        "server_uri": {
            "uri": f"{'https' if tls else 'http'}://{authority}:{port}",
            "cluster": cluster,
            "timeout": timeout,
        },
        # Envoy sends the original method, no body, host = the original :authority and
        # path = this prefix + the original :path.
        "path_prefix": check_prefix,
        "authorization_request": {
            # Envoy's own view of the client, the address the gRPC mode reads from
            # attributes.source; headers_to_add overwrites a client-sent header of this name.
            "headers_to_add": [
                {
                    "key": contract.PEER_ADDRESS_HEADER,
                    "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                }
            ]
        },
        "authorization_response": {
            # On 200: set (overwrite) these on the upstream request; the service names other
            # client-sent x-stepup-* in x-envoy-auth-headers-to-remove, which Envoy honours.
            "allowed_upstream_headers": {
                "patterns": [{"exact": h} for h in contract.UPSTREAM_HEADERS]
            },
            # On a denial: what the client sees (status and body always pass).
            "allowed_client_headers": {"patterns": [{"exact": h} for h in contract.CLIENT_HEADERS]},
            "dynamic_metadata_from_headers": {
                "patterns": [{"exact": h} for h in contract.METADATA_FROM_HEADERS]
            },
        },
    }


def ext_authz_filter(hcm: dict[str, Any]) -> dict[str, Any]:
    """The ext_authz entry of an HTTP connection manager's (typed config's) filter chain."""
    found: dict[str, Any] = next(f for f in hcm["http_filters"] if f["name"] == EXT_AUTHZ)
    return found


def peer_address_filter() -> dict[str, Any]:
    """gRPC mode: the client address Envoy computed, in the request the check sees.

    ext_authz's ``attributes.source.address`` is the connection's peer: with trusted hops
    that is the last proxy, not the client. This filter, in front of ext_authz, writes
    Envoy's own downstream remote address (the one its access log writes) into
    ``x-stepup-peer-address``, overwriting a client-sent value; the service reads only that
    (``grpc.peer_header``) and removes it from the upstream request with every other
    ``x-stepup-*`` header it did not set. Istio's EnvoyFilter and Envoy Gateway's
    EnvoyPatchPolicy (``render istio``, k8s/) insert this same filter."""
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": _TYPES + "filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {
                "request_mutations": [
                    {
                        "append": {
                            "header": {
                                "key": contract.PEER_ADDRESS_HEADER,
                                "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                            },
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                    }
                ]
            },
        },
    }


def _http_filter(service: dict[str, Any], assertion_header: str) -> dict[str, Any]:
    names = dict.fromkeys([*contract.REQUEST_HEADERS, assertion_header.lower()])
    return {
        "http_service": service,
        # The headers sent to the check (authorization, :method, :path and host always are).
        "allowed_headers": {
            "patterns": [{"exact": h} for h in names]
            + [{"prefix": p} for p in contract.REQUEST_HEADER_PREFIXES]
        },
    }


def render_envoy(
    policy: Policy,
    *,
    mode: Mode = "grpc",
    hosts: Sequence[str] = (),
    authz_cluster: str = "stepup_authz",
    stepup_cluster: str = "stepup_http",
    upstream_cluster: str = "upstream",
    listen_address: Address = ("0.0.0.0", 8080),
    admin_address: Address = ("127.0.0.1", 9901),
    authz_address: Address | Sequence[Address] | None = None,
    stepup_address: Address | Sequence[Address] = ("127.0.0.1", 9192),
    upstream_address: Address | Sequence[Address] = ("127.0.0.1", 8000),
    authz_timeout: str = "0.25s",
    route_timeout: str = "15s",
    xff_num_trusted_hops: int = 0,
    path_prefix: str = "/_stepup",
    check_path_prefix: str = contract.CHECK_PATH_PREFIX,
    device_assertion_header: str = contract.REQUEST_HEADERS[4],
    service_tls: ServiceTls | None = None,
    tracing: Tracing | None = None,
) -> dict[str, Any]:
    """A complete Envoy bootstrap (a dict) enforcing ``policy`` at the edge.

    ``tracing`` turns on Envoy's OpenTelemetry tracer: a span per request, exported as
    OTLP/HTTP to the collector, with the W3C ``traceparent`` propagated to the upstream and
    to the ext_authz call, so the service's Check span joins the same trace.

    ``mode`` is the ext_authz protocol: ``grpc`` (the service's gRPC port, 9191) or
    ``http`` (its HTTP ext_authz listener, ``http_authz``, 9193). ``authz_address`` (one
    endpoint or several: replicas, round robin) defaults to 127.0.0.1 on that port.
    ``hosts`` adds to the policy's hosts (see ``served_hosts``). ``authz_timeout`` must
    stay above the service's Redis deadline (``redis.deadline_ms``, 50 ms by default) so a
    slow store yields the service's own fail-closed answer rather than Envoy's bare 403.
    ``xff_num_trusted_hops`` is 0 when Envoy is the edge, 1 behind one load balancer that
    appends to X-Forwarded-For: the only place the hop count lives. Envoy computes the client
    address from it and hands exactly that address to the check (``x-stepup-peer-address``,
    both modes) and to ``/_stepup/``; the service never reads X-Forwarded-For.
    """
    if mode not in ("grpc", "http"):
        raise ConfigError(f"unknown ext_authz mode {mode!r}: grpc or http", location="--mode")
    if not 0 <= xff_num_trusted_hops <= 10:
        raise ConfigError("xff_num_trusted_hops must be 0..10", location="--xff-num-trusted-hops")
    if authz_address is None:
        authz_address = ("127.0.0.1", 9191 if mode == "grpc" else contract.HTTP_CHECK_PORT)
    authz_endpoints = _endpoints(authz_address)
    prefix = path_prefix.rstrip("/")
    if mode == "grpc":
        checks = _Checks("grpc")
        filter_config = _grpc_filter(authz_cluster, authz_timeout)
    else:
        service = _http_service(
            authz_cluster,
            authz_endpoints[0],
            authz_timeout,
            check_path_prefix,
            tls=service_tls is not None,
        )
        checks = _Checks("http", service)
        filter_config = _http_filter(service, device_assertion_header)
    vhosts = [
        {
            "name": "any-host" if host == ANY_HOST else f"host-{host.lstrip('.')}",
            "domains": [_domain(host)],
            "routes": _routes(
                policy,
                host,
                checks,
                upstream_cluster=upstream_cluster,
                stepup_cluster=stepup_cluster,
                path_prefix=prefix,
                route_timeout=route_timeout,
            ),
        }
        for host in served_hosts(policy, hosts)
    ]
    ext_authz = {
        "@type": _TYPES + "filters.http.ext_authz.v3.ExtAuthz",
        **filter_config,
        # Fail closed: a down, slow or broken authorizer denies, never allows. (In the HTTP
        # mode a 5xx from the service is an error too: Envoy answers this status.)
        "failure_mode_allow": False,
        "status_on_error": {"code": 403},
        # The service never rewrites routing headers: re-matching the route would only cost.
        "clear_route_cache": False,
    }
    hcm: dict[str, Any] = {
        "@type": _HCM,
        "stat_prefix": "edge",
        "codec_type": "AUTO",
        # One canonical path for the policy and the upstream: dot segments resolved, '//'
        # merged, encoded slashes refused, before routing and the check.
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        # "host." is "host" for routing and for the service alike.
        "strip_trailing_host_dot": True,
        "use_remote_address": True,
        "xff_num_trusted_hops": xff_num_trusted_hops,
        # Client certificates reach the step-up endpoints only as Envoy sets them.
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"cert": True},
        # Limits: a small header budget, bounded time to send headers and whole requests.
        "max_request_headers_kb": 60,
        "request_headers_timeout": "10s",
        "request_timeout": "60s",
        "stream_idle_timeout": "60s",
        "common_http_protocol_options": {
            "idle_timeout": "300s",
            "max_headers_count": 100,
            # 'x_stepup_user' would reach CGI/WSGI-style upstreams as X-Stepup-User, dodging
            # the removal of client-sent x-stepup-* headers: refuse it outright.
            "headers_with_underscores_action": "REJECT_REQUEST",
        },
        "http2_protocol_options": {
            "max_concurrent_streams": 100,
            "initial_stream_window_size": 65536,
            "initial_connection_window_size": 1048576,
        },
        "access_log": _access_log(mode),
        **({"tracing": _tracing(tracing)} if tracing is not None else {}),
        "http_filters": [
            *([peer_address_filter()] if mode == "grpc" else []),
            {"name": EXT_AUTHZ, "typed_config": ext_authz},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _TYPES + "filters.http.router.v3.Router"},
            },
        ],
        "route_config": {
            "name": "stepup-policy",
            # Policy hosts carry no port; match "host:8443" to "host" as well.
            "ignore_port_in_host_matching": True,
            "virtual_hosts": vhosts,
        },
    }
    stepup_tls = service_tls if service_tls is not None and service_tls.stepup else None
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
                        "@type": _TYPES
                        + "resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
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
                _cluster(
                    authz_cluster,
                    authz_endpoints,
                    protocol="http2" if mode == "grpc" else "http1",
                    tls=service_tls,
                    grpc_health=mode == "grpc",
                ),
                _cluster(stepup_cluster, _endpoints(stepup_address), tls=stepup_tls),
                _cluster(upstream_cluster, _endpoints(upstream_address)),
                *([_cluster(TRACING_CLUSTER, [tracing.address])] if tracing is not None else []),
            ],
        },
    }
