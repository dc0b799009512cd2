"""Our answer always comes before Envoy gives up: the per-Check budgets in the settings are
shorter than every ext_authz timeout we ship, and live, a paused Redis produces OUR denial
(with its reason header) through real Envoy, not Envoy's own timeout response."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from authz.audit.config import AuditSettings
from authz.config.policy_file import read_policy
from authz.config.settings import RedisSettings
from authz.demo.stack import REPO_ROOT, Stack
from authz.render import render_envoy

# `render envoy` in both modes (what the demo and the tests run), and the hand-made examples.
ENVOY_CONFIGS = ["render:grpc", "render:http", "envoy/edge.yaml", "envoy/sidecar.yaml"]
# A Check's worst case inside the service: the session read under its deadline, then (for an
# allow at or above the audit level) the durable audit write under its own; plus scheduling.
MARGIN_S = 0.05


def ext_authz_timeouts(doc: object) -> list[float]:
    """Every ``timeout`` inside an ext_authz filter config (grpc_service / http_service)."""
    found: list[float] = []

    def walk(node: object, inside: bool) -> None:
        if isinstance(node, dict):
            here = inside or "ExtAuthz" in str(node.get("@type", ""))
            for key, value in node.items():
                if here and key == "timeout" and isinstance(value, str):
                    found.append(float(value.rstrip("s")))
                walk(value, here)
        elif isinstance(node, list):
            for item in node:
                walk(item, inside)

    walk(doc, False)
    return found


def in_service_budget_s() -> float:
    return (RedisSettings().deadline_ms + AuditSettings().durable_deadline_ms) / 1000


@pytest.mark.parametrize("name", ENVOY_CONFIGS)
def test_deadlines_shorter_than_envoy_timeout(name: str) -> None:
    if name.startswith("render:"):
        policy = read_policy(REPO_ROOT / "examples" / "policy.yaml").policy
        doc = render_envoy(policy, mode=name.partition(":")[2], hosts=["app.example"])  # type: ignore[arg-type]
    else:
        doc = yaml.safe_load((REPO_ROOT / name).read_text())
    timeouts = ext_authz_timeouts(doc)
    assert timeouts, f"no ext_authz timeout found in {name}"
    for t in timeouts:
        assert in_service_budget_s() + MARGIN_S < t, (name, t, in_service_budget_s())
        # The Redis socket timeout (the backstop under the deadline) is inside it too.
        assert RedisSettings().deadline_ms / 1000 + 0.1 < t


def test_istio_and_helm_timeouts() -> None:
    mesh = (REPO_ROOT / "k8s/istio/meshconfig.yaml").read_text()
    t = [float(m) for m in re.findall(r"timeout:\s*([0-9.]+)s", mesh)]
    assert t and all(in_service_budget_s() + MARGIN_S < x for x in t), t
    values = yaml.safe_load((REPO_ROOT / "k8s/stepup-authz/values.yaml").read_text())
    text = yaml.safe_dump(values)
    m = re.search(r"deadlineMs: (\d+)", text)
    assert m is not None and int(m.group(1)) == RedisSettings().deadline_ms


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(
        tmp_path_factory.mktemp("deadline"),
        policy_file=REPO_ROOT / "examples" / "policy.yaml",
        separate_audit_redis=True,
    ) as s:
        yield s


def _redis(port: int, *cmd: str, timeout: float = 2) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        parts = [f"${len(c)}\r\n{c}\r\n" for c in cmd]
        s.sendall(f"*{len(cmd)}\r\n{''.join(parts)}".encode())
        return s.recv(256)


@pytest.mark.e2e
def test_paused_redis_our_reason_reaches_the_client_through_envoy(stack: Stack) -> None:
    import json
    import urllib.request

    form = (
        b"grant_type=password&username=bob&password=bob-password&client_id=stepup-authz"
        b"&client_secret=dev-secret"
    )
    with urllib.request.urlopen(f"{stack.idp_url}/token", data=form) as r:  # noqa: S310
        token = json.loads(r.read())["access_token"]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get() -> tuple[int, dict[str, str]]:
        req = urllib.request.Request(  # noqa: S310 - a fixed http:// loopback URL
            f"{stack.envoy_url}/accounts/1",
            headers={"Authorization": f"Bearer {token}"},
        )
        try:
            with opener.open(req, timeout=5) as resp:
                return resp.status, dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers)

    status, headers = get()
    assert (status, headers.get("x-stepup-reason")) == (401, "acr-insufficient")
    # (CLIENT UNPAUSE would itself wait behind the pause: Redis's own timer ends it.)
    assert _redis(stack.redis_port, "CLIENT", "PAUSE", "1500", "ALL").startswith(b"+OK")
    try:
        for _ in range(4):
            status, headers = get()
            # Ours: 403 with our reason and decision id, so before Envoy's 250 ms timeout
            # (Envoy's own timeout answer would be a bare 403 without them).
            assert (status, headers.get("x-stepup-reason")) == (403, "session-store-unavailable")
            assert headers.get("x-stepup-decision-id")
    finally:
        # Answered once the pause is over: the next test finds Redis as it was.
        assert _redis(stack.redis_port, "PING", timeout=10) == b"+PONG\r\n"
    path = Path(stack.log_path("service"))
    assert "Traceback" not in path.read_text(errors="replace")
