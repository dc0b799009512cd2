"""Client IP spoofing through the real Envoy.

Envoy's peer is always 127.0.0.1 here. The suite's policy makes the address the service
uses observable from both sides:

* ``/ops/`` is a level with ``ip_deny: [127.0.0.0/8]``: if a forged header moved the
  service's view of the client off loopback, the request would escape the deny (a 401 or
  200 instead of ``403 ip-not-allowed``);
* the ``external`` rule denies every request from outside loopback (``ip-external``): if
  the service believed a forged external address, a public page would be refused.

Envoy runs with ``use_remote_address: true, xff_num_trusted_hops: 0`` (the client address
is the TCP peer) and hands the service the address it computed in ``x-stepup-peer-address``,
overwriting a client-sent copy; the service never reads X-Forwarded-For. The chain with a
trusted hop in front of Envoy is ``tests/e2e/test_client_address.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from authz.check.request import PEER_HEADER, attributes_from_check, attributes_from_http
from authz.demo.stack import Stack
from tests import builders

from .helpers import Minter, raw_request

pytestmark = pytest.mark.e2e

FORGERIES: dict[str, list[tuple[str, str | bytes]]] = {
    "xff-single-external": [("X-Forwarded-For", "203.0.113.9")],
    "xff-leftmost-forged-chain": [("X-Forwarded-For", "203.0.113.9, 10.0.0.1, 127.0.0.1")],
    "xff-ends-with-loopback": [("X-Forwarded-For", "203.0.113.9, 127.0.0.1")],
    "xff-two-headers": [("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-For", "10.0.0.1")],
    "xff-ipv6": [("X-Forwarded-For", "2001:db8::1")],
    "xff-ipv4-mapped": [("X-Forwarded-For", "::ffff:203.0.113.9")],
    "xff-with-port": [("X-Forwarded-For", "203.0.113.9:443")],
    "xff-junk": [("X-Forwarded-For", "not-an-ip, <script>, ;;, 999.1.1.1")],
    "xff-empty": [("X-Forwarded-For", "")],
    "xff-commas-only": [("X-Forwarded-For", ",,,,")],
    "xff-8kib": [("X-Forwarded-For", ", ".join(["203.0.113.9"] * 600))],
    "xff-non-utf8": [("X-Forwarded-For", b"203.0.113.9\xff")],
    "x-real-ip": [("X-Real-IP", "203.0.113.9")],
    "forwarded-rfc7239": [("Forwarded", "for=203.0.113.9;proto=https")],
    "true-client-ip": [("True-Client-IP", "203.0.113.9")],
    "x-client-ip": [("X-Client-IP", "203.0.113.9")],
    "cf-connecting-ip": [("CF-Connecting-IP", "203.0.113.9")],
    "x-cluster-client-ip": [("X-Cluster-Client-IP", "203.0.113.9")],
    "x-envoy-external-address": [("X-Envoy-External-Address", "203.0.113.9")],
    "all-at-once": [
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Real-IP", "203.0.113.9"),
        ("Forwarded", "for=203.0.113.9"),
        ("True-Client-IP", "203.0.113.9"),
        ("X-Envoy-External-Address", "203.0.113.9"),
    ],
    "blocked-range-in-xff": [("X-Forwarded-For", "198.51.100.7")],
    # The header Envoy sets for the service: a client-sent copy is overwritten.
    "peer-header": [("X-Stepup-Peer-Address", "203.0.113.9")],
    "peer-header-twice": [
        ("X-Stepup-Peer-Address", "203.0.113.9"),
        ("X-Stepup-Peer-Address", "10.0.0.1"),
    ],
}


@pytest.mark.parametrize("name", list(FORGERIES))
async def test_forged_address_does_not_escape_an_ip_deny(
    sec_stack: Stack, minter: Minter, name: str, outcome: Callable[[str, str], None]
) -> None:
    token = minter.token(acr="pwd", amr=["pwd"])
    r = await raw_request(
        sec_stack.listen_port,
        "GET",
        "/ops/x",
        [("Authorization", f"Bearer {token}"), *FORGERIES[name]],
    )
    outcome("403 ip-not-allowed (the service saw Envoy's peer 127.0.0.1)", str(r))
    assert (r.status, r.reason) == (403, "ip-not-allowed"), str(r)


@pytest.mark.parametrize("name", list(FORGERIES))
async def test_forged_address_is_not_believed(
    sec_stack: Stack, name: str, outcome: Callable[[str, str], None]
) -> None:
    """A public page stays public: the ``external`` rule would deny it had the service
    believed the forged external address."""
    r = await raw_request(sec_stack.listen_port, "GET", "/public/x", list(FORGERIES[name]))
    seen = r.echo()
    outcome(
        "200 public (no ip-external / ip-blocked deny)",
        f"{r}; upstream x-envoy-external-address="
        f"{seen['headers'].get('x-envoy-external-address') if seen else None}",
    )
    assert r.status == 200 and seen is not None, str(r)
    assert seen["headers"]["x-stepup-level"] == "public"
    # What an upstream should use as the client address is Envoy's, not the client's.
    assert seen["headers"]["x-envoy-external-address"] == "127.0.0.1"
    # Envoy's header for the service is removed before the upstream, with every x-stepup-*.
    assert "x-stepup-peer-address" not in seen["headers"]


@pytest.mark.parametrize("name", list(FORGERIES))
def test_the_adapters_never_derive_an_address(
    name: str, outcome: Callable[[str, str], None]
) -> None:
    """Whatever forwarding headers arrive beside it, both adapters take the address Envoy
    set (here 127.0.0.1) and nothing else: no hop count, no second derivation."""
    forged: dict[str, str] = {}
    for k, v in FORGERIES[name]:
        if k.lower() != PEER_HEADER:
            text = v.decode("latin-1") if isinstance(v, bytes) else v
            forged[k.lower()] = f"{forged[k.lower()]},{text}" if k.lower() in forged else text
    envoys = {**forged, PEER_HEADER: "127.0.0.1"}
    grpc = attributes_from_check(builders.check_request("/x", envoys, ip="10.9.9.9"))
    http = attributes_from_http(
        "GET", "/check/x", {"host": "app.test", **envoys}, path_prefix="/check"
    )
    got = {str(grpc.source_ip), str(http.source_ip)}
    outcome("client ip 127.0.0.1 in both modes", f"client ip {sorted(got)}")
    assert got == {"127.0.0.1"}
