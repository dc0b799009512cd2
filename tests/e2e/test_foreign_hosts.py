"""Only the policy's hosts reach the upstream (issue 14, item 2), through the real Envoy that
``render envoy`` configures, in both ext_authz modes.

The attacker's story: a route is host-scoped (``trading.example.com /trading/`` needs
``high``); the attacker holds a password-only token and names another host, in ``Host``, in
HTTP/2 ``:authority`` or in an absolute request target, hoping Envoy sends it to the same
upstream at the default level. Envoy must answer 404 itself: the upstream cluster's request
counter and the service's check counter stay where they were.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import pytest
import yaml

from authz.demo.stack import Stack

from .test_stepup_flow import password_token

pytestmark = pytest.mark.e2e

HOST = "trading.example.com"
POLICY = """\
version: hosts-1
levels:
  public:   {public: true}
  standard: {}
  high:     {acr: [mfa, phr], max_age: 300}
routes:
  - {host: trading.example.com, path_prefix: /trading/, level: high}
  - {path_prefix: /public/, level: public}
default_level: standard
"""
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module", params=["grpc", "http"])
def hstack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp(f"hosts-{request.param}")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    # Loopback is served too (the IdP redirects there); "evil.example" is nobody's host.
    with Stack(workdir / "stack", policy_file=policy, mode=request.param) as s:
        yield s


@pytest.fixture(scope="module")
def token(hstack: Stack) -> str:
    return asyncio.run(password_token(hstack))


def _stat(stack: Stack, name: str) -> int:
    with _opener.open(f"{stack.admin_url}/stats?filter=^{name}$&format=json", timeout=5) as r:
        stats = json.load(r)["stats"]
    (value,) = [s["value"] for s in stats if s.get("name") == name]
    return int(value)


def _counters(stack: Stack) -> tuple[int, int]:
    """(requests the upstream cluster received, checks the service answered)."""
    checks = "cluster.stepup_authz.upstream_rq_total"
    return _stat(stack, "cluster.upstream.upstream_rq_total"), _stat(stack, checks)


def _http1(stack: Stack, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", stack.listen_port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, body


def _h2(stack: Stack, authority: str, path: str, token: str) -> tuple[int, dict[str, str]]:
    """One HTTP/2 request (prior knowledge, cleartext) naming ``authority``."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    with socket.create_connection(("127.0.0.1", stack.listen_port), timeout=10) as s:
        s.sendall(conn.data_to_send())
        conn.send_headers(
            1,
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", authority),
                (":path", path),
                ("authorization", f"Bearer {token}"),
            ],
            end_stream=True,
        )
        s.sendall(conn.data_to_send())
        status, headers, done = 0, {}, False
        while not done:
            data = s.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                    raw = {k.decode() if isinstance(k, bytes) else k: v for k, v in event.headers}
                    headers = {
                        k: (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()
                    }
                    status = int(headers[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
            s.sendall(conn.data_to_send())
        return status, headers


def _get(host: str, target: str, token: str) -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


def test_the_policy_host_is_challenged(hstack: Stack, token: str) -> None:
    """The control: on its own host the route asks a password-only token to step up."""
    status, headers, _ = _http1(hstack, _get(HOST, "/trading/x", token))
    assert (status, headers.get("x-stepup-reason")) == (401, "acr-insufficient")
    status, headers = _h2(hstack, HOST, "/trading/x", token)
    assert (status, headers.get("x-stepup-reason")) == (401, "acr-insufficient")
    status, _, body = _http1(hstack, _get("127.0.0.1", "/public/x", token))
    assert status == 200 and json.loads(body)["path"] == "/public/x"  # the upstream answers


@pytest.mark.parametrize(
    ("host", "target"),
    [
        pytest.param("evil.example", "/trading/x", id="host-header"),
        pytest.param("evil.example", "/public/x", id="host-header-public-path"),
        pytest.param("EVIL.example:443", "/trading/x", id="host-header-with-port"),
        pytest.param(f"{HOST}..", "/trading/x", id="two-trailing-dots"),
        pytest.param(f"x.{HOST}", "/trading/x", id="subdomain"),
        pytest.param(HOST, "http://evil.example/trading/x", id="absolute-target"),
        pytest.param(HOST, "http://evil.example:8080/public/x", id="absolute-target-public"),
    ],
)
def test_foreign_host_http1_gets_404_and_no_upstream(
    hstack: Stack, token: str, host: str, target: str
) -> None:
    before = _counters(hstack)
    status, headers, body = _http1(hstack, _get(host, target, token))
    assert status == 404, (status, headers, body)
    assert "x-stepup-decision-id" not in headers  # Envoy answered, not the service
    assert _counters(hstack) == before  # neither the upstream nor the check was called


@pytest.mark.parametrize("authority", ["evil.example", "evil.example:443", f"{HOST}.."])
def test_foreign_authority_http2_gets_404_and_no_upstream(
    hstack: Stack, token: str, authority: str
) -> None:
    before = _counters(hstack)
    status, headers = _h2(hstack, authority, "/trading/x", token)
    assert status == 404, headers
    assert _counters(hstack) == before


def test_an_absolute_target_naming_the_policy_host_is_judged_as_that_host(
    hstack: Stack, token: str
) -> None:
    """The other way round: ``Host: evil.example`` with ``http://trading.example.com/...``
    is the policy's host for Envoy (the request target wins, RFC 9112 section 3.2.2) and
    for the service alike: challenged, not served at the default level."""
    status, headers, _ = _http1(hstack, _get("evil.example", f"http://{HOST}/trading/x", token))
    assert (status, headers.get("x-stepup-reason")) == (401, "acr-insufficient")


def test_rendered_config_has_no_catch_all(hstack: Stack) -> None:
    doc = json.loads(json.dumps(hstack.envoy_config()))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    vhosts = hcm["typed_config"]["route_config"]["virtual_hosts"]
    domains = sorted(d for v in vhosts for d in v["domains"])
    assert domains == sorted([HOST, "127.0.0.1", "localhost"])  # no "*"
    on_disk = yaml.safe_load((hstack.workdir / "envoy.yaml").read_text())
    assert on_disk == doc  # Envoy runs exactly this
