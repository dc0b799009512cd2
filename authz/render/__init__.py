"""Proxy configuration generated from the policy, so the proxy and the policy cannot drift.

- ``envoy``: a complete Envoy bootstrap, gRPC or HTTP ext_authz, serving exactly the
  policy's hosts (plus those named on the command line): every other host gets 404.
- ``istio``: CUSTOM AuthorizationPolicies, the ``/_stepup/`` VirtualService and the
  EnvoyFilter that hands the check Envoy's client address.
- ``contract``: what every proxy must pass to the service and back (headers, the peer
  address, the check path), checked against each shipped config by ``tests/deploy``.
- ``cli``: ``stepup-authz render envoy|istio``.
"""

from authz.render.cli import add_render_parser
from authz.render.envoy import (
    EXT_AUTHZ,
    ServiceTls,
    ext_authz_filter,
    peer_address_filter,
    render_envoy,
    served_hosts,
)
from authz.render.istio import render_istio, service_host

__all__ = [
    "EXT_AUTHZ",
    "ServiceTls",
    "add_render_parser",
    "ext_authz_filter",
    "peer_address_filter",
    "render_envoy",
    "render_istio",
    "served_hosts",
    "service_host",
]
