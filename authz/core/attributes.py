"""RequestAttributes: the one object the policy sees, built once per Check at the edge.

Paths are decided on their canonical form, the same one Envoy forwards when its path
normalisation is on (RFC 3986 section 6.2.2: percent-decoding of unreserved characters,
dot-segment removal; plus merged slashes). A path that cannot be canonicalised without
guessing (an encoded slash or backslash, a ';' path parameter, bad percent-encoding,
control characters) is refused rather than interpreted.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from authz.core.reasons import Reason
from authz.errors import RequestError

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
_EMPTY: Mapping[str, str] = MappingProxyType({})
# A registered name (letters, digits, '-', '.', '_') or a bracketed IPv6 literal; a port.
_AUTHORITY = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::[0-9]{0,5})?")
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class RequestAttributes:
    method: str
    scheme: str
    host: str
    path: str  # canonical, without the query
    query: str
    headers: Mapping[str, str]  # lower-case names
    # The client's address as Envoy computed it (its use_remote_address and
    # xff_num_trusted_hops; authz/check/request.py), never re-derived here. None if unknown.
    source_ip: IpAddress | None
    context_extensions: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    request_id: str = ""
    peer_certificate: str = ""
    # The request body, only when Envoy sent the whole of it (a route at a transaction-bound
    # level buffers it: ``with_request_body``); None otherwise, a partial body included.
    body: bytes | None = None

    @property
    def accepts_html(self) -> bool:
        return "text/html" in self.headers.get("accept", "")

    @property
    def is_grpc(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/grpc")

    @property
    def path_and_query(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def normalize_host(authority: str) -> str:
    """Host without port or trailing dot, lower-cased; IPv6 literals keep their brackets.

    RFC 9110 section 7.2: ``Host = uri-host [ ":" port ]``. Anything else -- userinfo
    (``evil@host``), a second port, percent-encoding, ``;``, or two Host headers that Envoy
    joined with ``,`` -- is read differently by different upstreams, so it is refused
    (RequestError) rather than matched against host routes as some other name. An empty
    authority gives "" (the caller decides).
    """
    host = authority.strip().lower()
    if not host:
        return ""
    m = _AUTHORITY.fullmatch(host)
    if m is None:
        raise RequestError("invalid host", reason=Reason.BAD_REQUEST)
    name = m.group(1)
    return name if name.startswith("[") else name.rstrip(".")


def canonicalize_path(raw: str) -> tuple[str, str]:
    """Split ``raw`` into (canonical path, query). Raises RequestError when it cannot."""
    if not raw.startswith("/"):
        raise RequestError("path must start with '/'", reason=Reason.BAD_PATH)
    path, _, query = raw.partition("?")
    path = path.partition("#")[0]
    if "\\" in path:
        raise RequestError("backslash in path", reason=Reason.BAD_PATH)
    if ";" in path:
        # Path parameters: servlet containers drop them before mapping ("/accounts;x/1" is
        # their "/accounts/1", "/x/..;/wires" their "/wires"), most other servers keep them
        # as data. Which reading the upstream makes is unknowable here, so refuse.
        raise RequestError("path parameter (';') in path", reason=Reason.BAD_PATH)
    decoded = _decode_unreserved(path)
    segments: list[str] = []
    for seg in decoded.split("/"):
        if seg == ".":
            continue
        if seg == "..":
            if segments:
                segments.pop()
            continue
        if seg:
            segments.append(seg)
    canonical = "/" + "/".join(segments)
    if decoded.endswith(("/", "/.", "/..")) and canonical != "/":
        canonical += "/"
    return canonical, query


def _decode_unreserved(path: str) -> str:
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == "%":
            pair = path[i + 1 : i + 3]
            if len(pair) != 2 or not (pair[0] in _HEX and pair[1] in _HEX):
                raise RequestError("invalid percent-encoding", reason=Reason.BAD_PATH)
            byte = int(pair, 16)
            if byte in _UNRESERVED:
                out.append(chr(byte))
            elif byte in (0x2F, 0x5C):
                raise RequestError("encoded slash or backslash in path", reason=Reason.BAD_PATH)
            elif byte < 0x20 or byte == 0x7F:
                raise RequestError("encoded control character in path", reason=Reason.BAD_PATH)
            else:
                out.append("%" + pair.upper())
            i += 3
            continue
        if ord(c) <= 0x20 or ord(c) >= 0x7F:
            raise RequestError(
                "control, space or non-ASCII character in path", reason=Reason.BAD_PATH
            )
        out.append(c)
        i += 1
    return "".join(out)


def parse_ip(value: str) -> IpAddress | None:
    """Parse an address; IPv4-mapped IPv6 addresses become IPv4."""
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def cookie_values(header: str, name: str) -> list[str]:
    """All values of cookie ``name`` in a Cookie header (RFC 6265 section 5.4 syntax)."""
    found = []
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            found.append(value.strip().strip('"'))
    return found
