"""What Envoy sends -> RequestAttributes, for both ext_authz modes. The only module that
reads ext_authz requests; everything after it sees the frozen attributes.

gRPC (``attributes_from_check``): the ext_authz v3 ``CheckRequest``.

HTTP (``attributes_from_http``): Envoy's ``ExtAuthz.http_service`` protocol. What Envoy
sends (``ext_authz_http_impl.cc``, checked against Envoy 1.40 in
``tests/e2e/test_http_mode.py``): the **original method** (no body, ``content-length: 0``);
the original ``:path`` with ``http_service.path_prefix`` in front; ``host`` = the original
``:authority``; only the headers ``authorization_request.allowed_headers`` lets through
(plus ``authorization``), and the ``headers_to_add`` entries, which overwrite any client
value of the same name and may use Envoy's substitution formatters.

The client address is Envoy's, never derived here: the downstream remote address Envoy
computed itself (``use_remote_address`` with ``xff_num_trusted_hops``, or an original-IP
detection extension), which is also what its access log writes as
``%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%``. X-Forwarded-For is never read. Envoy sends it
in ``x-stepup-peer-address``: in the HTTP mode set by ``authorization_request.headers_to_add``,
in the gRPC mode by a ``header_mutation`` filter in front of ext_authz (``render envoy``
renders both). Both overwrite a client-sent header of that name; a check without it is
refused (fail closed). The gRPC mode cannot use ``attributes.source.address`` for this:
Envoy fills it with the connection's peer, which is the last proxy, not the client, as soon
as Envoy trusts a hop (``tests/e2e/test_client_address.py``). Only with
``grpc.peer_header: null`` is that peer read, for proxies that trust no hop and cannot set
the header.

Context extensions do not exist in the HTTP protocol. A route that must raise its level
uses a per-route ``check_settings.http_service`` whose ``path_prefix`` is
``<prefix>@<level>`` (e.g. ``/check@high``): the path then reads ``/check@high/wires/1``.
The character after the prefix is ``/`` for a plain check and ``@`` for a level, so no
original path (which always starts with ``/``) can be read as a level. The level only
raises, exactly like ``context_extensions.stepup_level``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType

from envoy.service.auth.v3 import external_auth_pb2

from authz.core.attributes import (
    IpAddress,
    RequestAttributes,
    canonicalize_path,
    normalize_host,
    parse_ip,
)
from authz.core.decision import CONTEXT_LEVEL_KEY
from authz.core.reasons import Reason
from authz.errors import RequestError

PEER_HEADER = "x-stepup-peer-address"
# Envoy sets it on a check that carries the buffered body: "false" when that is the whole
# body, "true" when max_request_bytes cut it (``check_request_utils.cc``).
PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"
MAX_BODY_BYTES = 1024 * 1024  # the policy's max_body_bytes is at most this
_LEVEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NO_CONTEXT: Mapping[str, str] = MappingProxyType({})

# Envoy already bounds header sizes; this is a second fence for what we copy per Check.
MAX_HEADERS = 200

# Pure functions of strings that repeat from Check to Check (a mesh sees a bounded set of
# paths, hosts and clients): memoised, bounded in entries and, since clients choose these
# strings, in size: longer inputs are computed every time (at most ~8k x 512 B cached).
# A refused value raises and is not cached.
_MEMO_MAX_LEN = 512
_canonical_memo = lru_cache(maxsize=8192)(canonicalize_path)
_host_memo = lru_cache(maxsize=1024)(normalize_host)
_ip_memo = lru_cache(maxsize=8192)(parse_ip)


def _canonical(raw: str) -> tuple[str, str]:
    return _canonical_memo(raw) if len(raw) <= _MEMO_MAX_LEN else canonicalize_path(raw)


def _host(authority: str) -> str:
    return _host_memo(authority) if len(authority) <= _MEMO_MAX_LEN else normalize_host(authority)


def envoy_client_address(value: str | None, header: str) -> IpAddress:
    """The client address Envoy computed, from the header it set (``header`` names it in
    the error); refused when missing or not an address: without it the IP rules and the
    bindings cannot be applied. Shared by both ext_authz modes."""
    ip = None
    if value:
        ip = _ip_memo(value) if len(value) <= _MEMO_MAX_LEN else parse_ip(value)
    if ip is None:
        raise RequestError(f"missing or invalid {header}", reason=Reason.BAD_REQUEST)
    return ip


def whole_body(raw: bytes, headers: Mapping[str, str]) -> bytes | None:
    """The body Envoy sent when it is the whole body, else None (no body known).

    Whole means: Envoy said so (``x-envoy-auth-partial-body: false``, which it sets only
    when it buffered a body), the client's ``content-length``, when it sent one, is the
    length received (without one, the body is not empty), and it fits ``MAX_BODY_BYTES``.
    A partial body binds nothing: the approval would cover bytes the user never saw the end
    of."""
    if headers.get(PARTIAL_BODY_HEADER) != "false" or len(raw) > MAX_BODY_BYTES:
        return None
    length = headers.get("content-length")
    if length is None:
        # No length to check against: an empty "whole body" is what a client's own header
        # on a route Envoy does not buffer would look like, so it is no body.
        return raw or None
    if not length.isdigit() or int(length) != len(raw):
        return None
    return raw


def _canonical_method(method: str) -> None:
    """Refuse a method in any case but its own: upper-casing ``post`` here would judge it
    as ``POST`` while Envoy, whose ``:method`` matchers are case-sensitive, routed it past
    its ``POST`` routes, and the upstream may well serve it as a POST."""
    if not method.isupper():
        raise RequestError(
            f"method {method[:20]!r} is not upper case (methods are case-sensitive)",
            reason=Reason.METHOD_NOT_CANONICAL,
        )


def attributes_from_check(
    req: external_auth_pb2.CheckRequest, peer_header: str | None = PEER_HEADER
) -> RequestAttributes:
    """Build the attributes; raises RequestError for a request we refuse to interpret.

    The client address is the ``peer_header`` Envoy set; with ``peer_header=None``,
    Envoy's connection peer (``attributes.source.address``)."""
    ctx = req.attributes
    http = ctx.request.http
    if len(http.headers) > MAX_HEADERS:
        raise RequestError("too many headers", reason=Reason.BAD_REQUEST)
    headers = MappingProxyType(dict(http.headers))  # Envoy sends lower-case names
    method = http.method or headers.get(":method", "")
    # ASCII letters only: str.isalpha() is Unicode-aware, and an RFC 9110 method token
    # never holds anything else (found by tests/fuzz/fuzz_envoy_in.py).
    if not method or not method.isascii() or not method.isalpha():
        raise RequestError("missing or invalid method", reason=Reason.BAD_REQUEST)
    _canonical_method(method)
    raw_path = http.path or headers.get(":path", "")
    path, query = _canonical(raw_path)
    host = _host(http.host or headers.get(":authority", ""))
    if not host:
        raise RequestError("missing host", reason=Reason.BAD_REQUEST)
    if peer_header is not None:
        source_ip: IpAddress | None = envoy_client_address(headers.get(peer_header), peer_header)
    else:
        source_ip = _ip_memo(ctx.source.address.socket_address.address)
    return RequestAttributes(
        method=method,
        scheme=http.scheme or headers.get(":scheme", "http"),
        host=host,
        path=path,
        query=query,
        headers=headers,
        source_ip=source_ip,
        context_extensions=MappingProxyType(dict(ctx.context_extensions)),
        request_id=http.id or headers.get("x-request-id", ""),
        peer_certificate=ctx.source.certificate,
        # raw_body with pack_as_bytes (what ``render`` sets), else the UTF-8 body field.
        body=whole_body(http.raw_body or http.body.encode(), headers)
        if PARTIAL_BODY_HEADER in headers
        else None,
    )


def attributes_from_http(
    method: str,
    target: str,
    headers: Mapping[str, str],
    *,
    path_prefix: str,
    peer_header: str = PEER_HEADER,
) -> RequestAttributes:
    """Build the attributes from one check request; raises RequestError to refuse it.

    ``headers`` has lower-case names (one value each: Envoy joins repeats with ``,`` before
    sending). The path after ``path_prefix`` is canonicalised exactly like the gRPC mode.
    """
    # ASCII letters only: str.isalpha() is Unicode-aware, and an RFC 9110 method token
    # never holds anything else (found by tests/fuzz/fuzz_envoy_in.py).
    if not method or not method.isascii() or not method.isalpha():
        raise RequestError("missing or invalid method", reason=Reason.BAD_REQUEST)
    _canonical_method(method)
    if not target.startswith(path_prefix):
        raise RequestError("check path outside the configured prefix", reason=Reason.BAD_REQUEST)
    rest = target[len(path_prefix) :]
    context: Mapping[str, str] = _NO_CONTEXT
    if rest.startswith("@"):
        level, slash, original = rest[1:].partition("/")
        if not slash or _LEVEL.fullmatch(level) is None:
            raise RequestError("invalid level segment in the check path", reason=Reason.BAD_REQUEST)
        rest = "/" + original
        context = MappingProxyType({CONTEXT_LEVEL_KEY: level})
    path, query = _canonical(rest)
    host = _host(headers.get("host", ""))
    if not host:
        raise RequestError("missing host", reason=Reason.BAD_REQUEST)
    source_ip = envoy_client_address(headers.get(peer_header), peer_header)
    return RequestAttributes(
        method=method,
        scheme=headers.get("x-forwarded-proto", "http"),
        host=host,
        path=path,
        query=query,
        headers=MappingProxyType(dict(headers)),
        source_ip=source_ip,
        context_extensions=context,
        request_id=headers.get("x-request-id", ""),
    )
