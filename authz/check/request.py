"""CheckRequest -> RequestAttributes. The only module that reads ext_authz request protos."""

from __future__ import annotations

from functools import lru_cache
from types import MappingProxyType

from envoy.service.auth.v3 import external_auth_pb2

from authz.core.attributes import (
    IpAddress,
    RequestAttributes,
    canonicalize_path,
    client_ip,
    normalize_host,
)
from authz.errors import RequestError

# Envoy already bounds header sizes; this is a second fence for what we copy per Check.
MAX_HEADERS = 200

# Pure functions of strings that repeat from Check to Check (a mesh sees a bounded set of
# paths, hosts and peers): memoised, bounded in entries and, since clients choose these
# strings, in size: longer inputs are computed every time (at most ~8k x 512 B cached).
# A refused value raises and is not cached.
_MEMO_MAX_LEN = 512
_canonical_memo = lru_cache(maxsize=8192)(canonicalize_path)
_host_memo = lru_cache(maxsize=1024)(normalize_host)
_client_ip_memo = lru_cache(maxsize=8192)(client_ip)


def _canonical(raw: str) -> tuple[str, str]:
    return _canonical_memo(raw) if len(raw) <= _MEMO_MAX_LEN else canonicalize_path(raw)


def _host(authority: str) -> str:
    return _host_memo(authority) if len(authority) <= _MEMO_MAX_LEN else normalize_host(authority)


def _client_ip(peer: str, xff: str | None, hops: int) -> IpAddress | None:
    if hops <= 0:
        xff = None  # not read without trusted hops: keep it out of the memo's key
    if len(peer) + len(xff or "") <= _MEMO_MAX_LEN:
        return _client_ip_memo(peer, xff, hops)
    return client_ip(peer, xff, hops)


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
    # ASCII letters only: str.isalpha() is Unicode-aware, and an RFC 9110 method token
    # never holds anything else (found by tests/fuzz/fuzz_envoy_in.py).
    if not method or not method.isascii() or not method.isalpha():
        raise RequestError("missing or invalid method", reason="bad-request")
    raw_path = http.path or headers.get(":path", "")
    path, query = _canonical(raw_path)
    host = _host(http.host or headers.get(":authority", ""))
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
        source_ip=_client_ip(sock.address, headers.get("x-forwarded-for"), trusted_hops),
        context_extensions=MappingProxyType(dict(ctx.context_extensions)),
        request_id=http.id or headers.get("x-request-id", ""),
        peer_certificate=ctx.source.certificate,
    )
