"""What the service needs from the proxy in front of it, in one place.

Every rendered or shipped proxy config (``render envoy`` in both modes, the Envoy Gateway
manifest, Istio's provider) must pass these request headers to the check and these answer
headers back; ``tests/deploy`` checks each config against this module, and this module
against the code that reads the headers (``tests/deploy/test_service_contract.py`` walks
the service's source for every header it reads).
"""

from __future__ import annotations

from authz.check.request import PEER_HEADER
from authz.check.response import HEADER_PREFIX, METADATA_HEADERS, REMOVE_HEADER
from authz.config.settings import DeviceAssertionSettings, HttpAuthzSettings

# Request headers the service reads (authz/check, authz/core). Envoy always sends
# authorization, :method, :path and host in the HTTP mode; the gRPC mode sends every header
# unless an allowlist is set, which must then hold these.
REQUEST_HEADERS: tuple[str, ...] = (
    "authorization",  # the bearer token
    "cookie",  # the token cookie, the device cookie
    "accept",  # browser (302) or API client (401)
    "content-type",  # gRPC clients get gRPC statuses
    str(DeviceAssertionSettings.model_fields["header"].default),  # the MDM's device assertion
    "x-forwarded-proto",
    "x-request-id",  # joins the audit record to Envoy's access log
    "traceparent",  # W3C trace context: a check joins the caller's trace
    "referer",  # a transaction-bound POST: the same-origin page the browser resubmits from
)
# Client-sent copies of our identity headers must reach the check too: the service names
# them for removal (HTTP mode) or overwrites them (gRPC mode), so none reaches the upstream.
REQUEST_HEADER_PREFIXES: tuple[str, ...] = (HEADER_PREFIX,)

# The client address Envoy computed, in both modes (HTTP: headers_to_add; gRPC: a
# header_mutation filter in front of ext_authz; both overwrite any client value), and the
# check path prefix routes extend with "@<level>".
PEER_ADDRESS_HEADER = PEER_HEADER
CHECK_PATH_PREFIX = str(HttpAuthzSettings.model_fields["path_prefix"].default)
HTTP_CHECK_PORT = int(HttpAuthzSettings.model_fields["port"].default)

# Answer headers (HTTP mode; the gRPC mode carries them in the CheckResponse itself).
UPSTREAM_HEADERS: tuple[str, ...] = (
    "x-stepup-user",
    "x-stepup-level",
    "x-stepup-acr",
    "x-stepup-issuer",
    "x-stepup-auth-time",
    "x-stepup-decision-id",
    "x-stepup-risk",
    "x-stepup-amr",
)
CLIENT_HEADERS: tuple[str, ...] = (
    "location",
    "www-authenticate",
    "x-stepup-reason",
    "x-stepup-decision-id",
    "cache-control",
    "content-type",
    "retry-after",
    # a browser's refusal page (authz.stepup.pages): nothing loads, nothing frames it
    "content-security-policy",
    "x-content-type-options",
)
METADATA_FROM_HEADERS: tuple[str, ...] = METADATA_HEADERS
HEADERS_TO_REMOVE = REMOVE_HEADER

# The gRPC health service name Envoy's active health check asks for.
GRPC_HEALTH_SERVICE = "envoy.service.auth.v3.Authorization"
