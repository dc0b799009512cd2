"""One client address, Envoy's, through two real Envoys in a chain, in both ext_authz modes.

The chain: client -> a front proxy (a plain Envoy standing in for the cloud load balancer:
it appends the address it received from to X-Forwarded-For and connects on from an address
of its own, 127.0.0.250) -> the edge Envoy, configured by ``stepup-authz render envoy
--xff-num-trusted-hops 1`` (the CLI itself, not a template) -> the service.

Loopback is all of 127.0.0.0/8, so each client binds its own source address: 127.0.0.5 is
an ordinary client, 127.0.0.77 sits in the policy's blocked range.

The attacker's story: a client behind the load balancer writes X-Forwarded-For (or the
service's own peer header) to choose the address the policy sees, to escape the blocked
range or to be taken for an internal address; or the service counts the balancer's hop a
second time and sees every user as the balancer or as the host. What must hold: the address
the policy sees (the audit record's ``client_ip``, joined by decision id) is exactly the
downstream remote address the edge Envoy writes in its access log, whatever the client
sends, and the blocked client is denied behind the front proxy.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.audit.export import read_records
from authz.demo.stack import REPO_ROOT, Stack, _Proc, _tool, free_ports, http_ok

pytestmark = pytest.mark.e2e

POLICY = """\
version: client-address-1
levels:
  standard: {}
default_level: standard
rules:
  - {name: blocked, when: {ip_in: [127.0.0.64/26]}, deny: ip-blocked}
"""
CLIENT, BLOCKED = "127.0.0.5", "127.0.0.77"
FRONT_SOURCE = "127.0.0.250"  # the front proxy's own address towards the edge
WAIT_S = 20.0
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."


class RenderedStack(Stack):
    """The stack with its edge Envoy configured by the ``render envoy`` command line."""

    def envoy_config(self) -> dict[str, Any]:
        def addr(a: tuple[str, int]) -> str:
            return f"{a[0]}:{a[1]}"

        argv = [
            sys.executable,
            "-m",
            "authz.cli",
            "render",
            "envoy",
            "--policy",
            str(self.policy_file),
            "--mode",
            self.mode,
            "--listen",
            f"127.0.0.1:{self.listen_port}",
            "--admin",
            f"127.0.0.1:{self.admin_port}",
            "--authz",
            addr(self.check_endpoints()[0]),
            "--stepup",
            addr(self.stepup_endpoints()[0]),
            "--upstream",
            f"127.0.0.1:{self.upstream_port}",
            "--authz-timeout",
            self.authz_timeout,
            "--xff-num-trusted-hops",
            str(self.xff_num_trusted_hops),
        ]
        for host in self.hosts:
            argv += ["--host", host]
        path = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        doc: dict[str, Any] = yaml.safe_load(out.stdout)
        return doc


def _front_config(listen: int, admin: int, edge: int) -> dict[str, Any]:
    """A load balancer: the client's address appended to X-Forwarded-For (it trusts no
    hop itself), everything sent on to the edge Envoy from FRONT_SOURCE."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "front",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": _HCM + "HttpConnectionManager",
                                        "stat_prefix": "front",
                                        "use_remote_address": True,
                                        "xff_num_trusted_hops": 0,
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "edge"},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy."
                                                    "extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "edge",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "upstream_bind_config": {
                        "source_address": {"address": FRONT_SOURCE, "port_value": 0}
                    },
                    "load_assignment": {
                        "cluster_name": "edge",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": edge,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


class Chain:
    def __init__(self, stack: Stack, front_port: int) -> None:
        self.stack, self.front_port = stack, front_port

    def get(self, source: str, headers: list[tuple[str, str]]) -> tuple[int, dict[str, str]]:
        """``GET /accounts/1`` from ``source`` to the front proxy, without a token."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        request = (
            f"GET /accounts/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n"
        ).encode()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.bind((source, 0))
            s.connect(("127.0.0.1", self.front_port))
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        fields = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            fields[k.strip().lower()] = v.strip()
        return int(head[0].split()[1]), fields

    def edge_log(self, decision_id: str) -> dict[str, Any]:
        """The edge Envoy's access log line for one check (render's own access log)."""
        deadline = time.monotonic() + WAIT_S
        while True:
            for line in self.stack.log_path("envoy").read_text(errors="replace").splitlines():
                if decision_id in line and line.startswith("{"):
                    entry: dict[str, Any] = json.loads(line)
                    if entry.get("decision_id") == decision_id:
                        return entry
            assert time.monotonic() < deadline, f"no access log line for {decision_id}"
            time.sleep(0.05)

    def audited(self, decision_id: str) -> dict[str, Any]:
        """The service's audit record of that check, from the exporter's archive."""
        deadline = time.monotonic() + WAIT_S
        while True:
            archive = self.stack.audit_dir
            recs = read_records([archive]) if archive.is_dir() else []
            found = [r for r in recs if r.get("decision_id") == decision_id]
            if found:
                (rec,) = found
                return rec
            assert time.monotonic() < deadline, f"no audit record for {decision_id}"
            time.sleep(0.05)


@pytest.fixture(scope="module", params=["grpc", "http"])
def chain(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Chain]:
    workdir: Path = tmp_path_factory.mktemp(f"client-address-{request.param}")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    with RenderedStack(
        workdir / "stack", policy_file=policy, mode=request.param, xff_num_trusted_hops=1
    ) as stack:
        listen, admin = free_ports(2)
        cfg = workdir / "front.yaml"
        cfg.write_text(yaml.safe_dump(_front_config(listen, admin, stack.listen_port)))
        front = _Proc(
            "front",
            [_tool("envoy"), "-c", str(cfg), "--log-level", "warn", "--disable-hot-restart"],
            workdir / "front.log",
            dict(os.environ),
        )
        front.start()
        try:
            ready = f"http://127.0.0.1:{admin}/ready"
            front.wait_ready(ready, lambda: http_ok(ready, expect=b"LIVE"), 20.0)
            yield Chain(stack, listen)
        finally:
            front.stop()


def test_the_edge_config_is_rendered_with_the_hop_count(chain: Chain) -> None:
    on_disk = yaml.safe_load((chain.stack.workdir / "envoy.yaml").read_text())
    hcm = on_disk["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert hcm["typed_config"]["xff_num_trusted_hops"] == 1
    assert hcm["typed_config"]["use_remote_address"] is True


@pytest.mark.parametrize(
    ("source", "headers", "expected"),
    [
        pytest.param(CLIENT, [], CLIENT, id="plain"),
        pytest.param(CLIENT, [("X-Forwarded-For", "198.51.100.7")], CLIENT, id="spoofed-xff"),
        pytest.param(
            CLIENT, [("X-Forwarded-For", f"10.0.0.1, {BLOCKED}")], CLIENT, id="spoofed-xff-chain"
        ),
        pytest.param(
            CLIENT,
            [("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2")],
            CLIENT,
            id="two-xff-headers",
        ),
        pytest.param(CLIENT, [("X-Stepup-Peer-Address", BLOCKED)], CLIENT, id="forged-peer-header"),
        pytest.param(
            CLIENT,
            [("X-Real-IP", "10.0.0.1"), ("X-Envoy-External-Address", "10.0.0.1")],
            CLIENT,
            id="other-forwarding-headers",
        ),
        pytest.param(BLOCKED, [], BLOCKED, id="blocked-client"),
        pytest.param(
            BLOCKED, [("X-Forwarded-For", CLIENT)], BLOCKED, id="blocked-client-spoofing-xff"
        ),
        pytest.param(
            BLOCKED, [("X-Stepup-Peer-Address", CLIENT)], BLOCKED, id="blocked-forging-peer"
        ),
    ],
)
def test_the_policy_sees_the_address_envoy_logs(
    chain: Chain, source: str, headers: list[tuple[str, str]], expected: str
) -> None:
    status, answer = chain.get(source, headers)
    decision_id = answer["x-stepup-decision-id"]
    logged = chain.edge_log(decision_id)["downstream_remote_address"]
    seen = chain.audited(decision_id)["client_ip"]
    assert logged == expected  # Envoy computed it from its one hop count
    assert seen == logged  # and the policy saw exactly that
    assert seen not in (FRONT_SOURCE, "127.0.0.1")  # never the balancer, never the host
    if expected == BLOCKED:
        assert (status, answer.get("x-stepup-reason")) == (403, "ip-blocked")
    else:
        assert (status, answer.get("x-stepup-reason")) == (401, "no-credentials")
