"""CheckRequest -> RequestAttributes. The only module that reads ext_authz request protos."""

from __future__ import annotations

from types import MappingProxyType

from envoy.service.auth.v3 import external_auth_pb2

from authz.core.attributes import (
    RequestAttributes,
    canonicalize_path,
    client_ip,
    normalize_host,
)
from authz.errors import RequestError

# Envoy already bounds header sizes; this is a second fence for what we copy per Check.
MAX_HEADERS = 200


def attributes_from_check(
    req: external_auth_pb2.CheckRequest, trusted_hops: int = 0
) -> RequestAttributes:
    """Build the attributes; raises RequestError for a request we refuse to interpret."""
    ctx = req.attributes
    http = ctx.request.http
    if len(http.headers) > MAX_HEADERS:
        raise RequestError("too many headers", reason="bad-request")
    headers = MappingProxyType(dict(http.headers))  # Envoy sends lower-case names
    method = http.method or headers.get(":method", "")
    if not method or not method.isalpha():
        raise RequestError("missing or invalid method", reason="bad-request")
    raw_path = http.path or headers.get(":path", "")
    path, query = canonicalize_path(raw_path)
    host = normalize_host(http.host or headers.get(":authority", ""))
    if not host:
        raise RequestError("missing host", reason="bad-request")
    sock = ctx.source.address.socket_address
    return RequestAttributes(
        method=method.upper(),
        scheme=http.scheme or headers.get(":scheme", "http"),
        host=host,
        path=path,
        query=query,
        headers=headers,
        source_ip=client_ip(sock.address, headers.get("x-forwarded-for"), trusted_hops),
        context_extensions=MappingProxyType(dict(ctx.context_extensions)),
        request_id=http.id or headers.get("x-request-id", ""),
        peer_certificate=ctx.source.certificate,
    )
