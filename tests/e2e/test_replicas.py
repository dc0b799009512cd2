"""Three replicas from the Helm chart, without a cluster (issue 14, item 7).

The chart is rendered by Helm's own library; each replica gets the files its pod would
mount (the settings ConfigMap, the policy, the keys Secret the chart generated, the OIDC
client Secret an operator creates) under a root of its own, and runs exactly the
container's command on them. Only the mount root is rewritten, plus what the pod's network
namespace would give it for free: its own loopback ports (STEPUP_*_HOST/PORT). One Envoy,
rendered by ``render envoy`` for the chart's policy, balances round robin over the three.

The operator's story: a browser steps up through one replica; the next requests, answered
by the other two, are allowed on that grant; after all three restart one by one (a
rollout), the grant still holds. With a key per pod each of those steps fails: the link or
the grant would not verify on another replica.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import helm_python as helm
import pytest
import yaml

from authz.demo.stack import (
    AUDIENCE,
    CLIENT_SECRET,
    HOST,
    REPO_ROOT,
    Stack,
    _Proc,
    free_ports,
    http_ok,
)
from authz.render.envoy import Address
from tests.deploy.chart import CHART, mount_pod_files, render, rerooted

from .test_stepup_flow import Browser

pytestmark = pytest.mark.e2e

REPLICAS = 3
DEMO_POLICY = REPO_ROOT / "examples" / "policy.yaml"
OIDC_SECRET = "stepup-authz-oidc"
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ChartReplicas(Stack):
    """Valkey, the dev IdP, the echo app and one Envoy from the stack; three service
    processes from the chart's rendered manifests behind that Envoy."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(
            workdir, policy_file=DEMO_POLICY, with_service=False, with_audit_exporter=False
        )
        ports = free_ports(3 * REPLICAS)
        self.replica_ports = [tuple(ports[i * 3 : i * 3 + 3]) for i in range(REPLICAS)]
        self.docs: list[dict[str, Any]] = []

    def chart_values(self) -> dict[str, Any]:
        """What an operator would give ``helm install`` for this environment."""
        return {
            "replicaCount": REPLICAS,
            "autoscaling": {"enabled": False},
            # The schema wants https origins; a dev environment overrides them in config:.
            "oidc": {
                "issuer": "https://idp.invalid",
                "audience": AUDIENCE,
                "algorithms": ["RS256"],
                "tokenTyp": "at+jwt",
                "clientSecret": {"existingSecret": OIDC_SECRET, "key": "client-secret"},
            },
            "stepup": {"publicUrl": "https://app.invalid"},
            "redis": {"url": self.redis_url},
            "policy": {"content": DEMO_POLICY.read_text()},
            "auditExporter": {"enabled": False},
            "config": {
                "oidc": {"issuer": self.idp_url},
                "stepup": {"public_url": self.envoy_url, "cookie_secure": False},
            },
        }

    def root(self, i: int) -> Path:
        return self.workdir / f"pod-{i}"

    def check_endpoints(self) -> list[Address]:
        return [(HOST, grpc) for grpc, _, _ in self.replica_ports]

    def stepup_endpoints(self) -> list[Address]:
        return [(HOST, http) for _, http, _ in self.replica_ports]

    def http_url(self, i: int) -> str:
        return f"http://{HOST}:{self.replica_ports[i][1]}"

    def _write_files(self) -> None:
        with helm.Chart.load(CHART) as chart:
            self.docs = render(chart, self.chart_values())
        for i in range(REPLICAS):
            self._mount(i)
        # Envoy: `render envoy` for the policy exactly as the chart mounts it.
        self.policy_file = self.root(0) / "etc/stepup-authz/policy/policy.yaml"
        super()._write_files()

    def _mount(self, i: int) -> None:
        root = self.root(i)
        self.container = mount_pod_files(
            self.docs,
            "stepup-authz",
            "stepup-authz",
            root,
            secrets={OIDC_SECRET: {"client-secret": CLIENT_SECRET}},
        )
        config = root / "etc/stepup-authz/config.yaml"
        config.write_text(yaml.safe_dump(rerooted(yaml.safe_load(config.read_text()), root)))

    def _replica(self, i: int) -> _Proc:
        grpc, http, metrics = self.replica_ports[i]
        argv = rerooted(self.container["args"], self.root(i))
        env = dict(self._env)
        env.update({e["name"]: e["value"] for e in self.container.get("env", [])})
        env.update(  # the pod's own network namespace, on this one host
            STEPUP_GRPC_HOST=HOST,
            STEPUP_GRPC_PORT=str(grpc),
            STEPUP_HTTP_HOST=HOST,
            STEPUP_HTTP_PORT=str(http),
            STEPUP_METRICS_HOST=HOST,
            STEPUP_METRICS_PORT=str(metrics),
        )
        # The image's entrypoint is the console script; the container's args follow it.
        proc = _Proc(
            f"replica-{i}",
            [str(Path(sys.executable).parent / "stepup-authz"), *argv],
            self.log_path(f"replica-{i}"),
            env,
        )
        self._procs[proc.name] = proc
        return proc

    def start_replica(self, i: int) -> None:
        proc = self._procs.get(f"replica-{i}") or self._replica(i)
        proc.start()
        readyz = f"{self.http_url(i)}/readyz"
        proc.wait_ready(readyz, lambda: http_ok(readyz), self.ready_timeout)

    def stop_replica(self, i: int) -> None:
        self._procs[f"replica-{i}"].stop()

    def _start(self) -> None:
        super()._start()
        for i in range(REPLICAS):
            self.start_replica(i)

    def metric(self, i: int, name: str, **labels: str) -> float:
        """The sum of ``name`` samples with ``labels`` on replica ``i``'s /metrics."""
        # /metrics on its own port (the chart's metricsPort), not on the step-up port.
        metrics_url = f"http://{HOST}:{self.replica_ports[i][2]}/metrics"
        with _opener.open(metrics_url, timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            if series.partition("{")[0] != name:
                continue
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total

    def wait_all_healthy(self, timeout: float = 30.0) -> None:
        """Until Envoy's active health check sees every replica SERVING again."""
        deadline = time.monotonic() + timeout
        while True:
            with _opener.open(f"{self.admin_url}/clusters?format=json", timeout=5) as r:
                clusters = json.load(r)["cluster_statuses"]
            (authz,) = [c for c in clusters if c["name"] == "stepup_authz"]
            flags = [h.get("health_status", {}) for h in authz["host_statuses"]]
            healthy = [
                f.get("eds_health_status") == "HEALTHY" and not f.get("failed_active_health_check")
                for f in flags
            ]
            if len(flags) == REPLICAS and all(healthy):
                return
            assert time.monotonic() < deadline, f"replicas not healthy in Envoy: {flags}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartReplicas]:
    with ChartReplicas(tmp_path_factory.mktemp("replicas")) as s:
        yield s


@pytest.fixture
async def browser(replicas: ChartReplicas) -> AsyncIterator[Browser]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        yield Browser(s, replicas)


ALLOWED = {"outcome": "allow", "level": "elevated"}


async def _allowed_by_every_replica(s: ChartReplicas, b: Browser, path: str) -> None:
    """Requests until each replica has allowed one at ``elevated``; every one must be 200."""
    start = [s.metric(i, "stepup_authz_checks_total", **ALLOWED) for i in range(REPLICAS)]
    for _ in range(12 * REPLICAS):
        status, _, body = await b.get(path)
        assert status == 200, body
        assert json.loads(body)["headers"]["x-stepup-level"] == "elevated"
        now = [s.metric(i, "stepup_authz_checks_total", **ALLOWED) for i in range(REPLICAS)]
        if all(n > b0 for n, b0 in zip(now, start, strict=True)):
            return
    raise AssertionError(f"not every replica answered: allows {start} -> {now}")


def test_the_replicas_run_the_chart_as_rendered(replicas: ChartReplicas) -> None:
    """One keys Secret for all three pods, and the settings as the chart rendered them."""
    docs = replicas.docs
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    for i in range(REPLICAS):
        root = replicas.root(i)
        keys = root / "etc/stepup-authz/secrets/keys"
        assert sorted(p.name for p in keys.iterdir()) == sorted(secret["data"])
        config = yaml.safe_load((root / "etc/stepup-authz/config.yaml").read_text())
        assert config["crypto"]["keys"] == {"k1": str(keys / "crypto-k1")}
        assert config["stepup"]["context_key_file"] == str(keys / "stepup-context")
        assert config["crypto"]["require"] is True
    a, b = (replicas.root(i) / "etc/stepup-authz/secrets/keys/crypto-k1" for i in (0, 1))
    assert a.read_bytes() == b.read_bytes()


async def test_step_up_on_one_replica_holds_on_all_and_across_restarts(
    replicas: ChartReplicas, browser: Browser
) -> None:
    replicas.wait_all_healthy()
    await browser.sign_in("/accounts/123")
    await browser.step_up("/accounts/123")
    done = [
        replicas.metric(
            i, "stepup_authz_stepup_completions_total", level="elevated", result="success"
        )
        for i in range(REPLICAS)
    ]
    assert sum(done) == 1, done  # the callback ran on exactly one replica ...
    await _allowed_by_every_replica(replicas, browser, "/accounts/123")  # ... all three allow

    for i in range(REPLICAS):  # a rollout: one by one, each pod replaced
        pid = replicas.pid(f"replica-{i}")
        replicas.stop_replica(i)
        replicas.start_replica(i)
        assert replicas.pid(f"replica-{i}") != pid
    replicas.wait_all_healthy()
    await _allowed_by_every_replica(replicas, browser, "/accounts/123")
    for i in range(REPLICAS):
        # Nothing another replica wrote failed to decrypt: one keyring.
        assert replicas.metric(i, "stepup_authz_corrupt_grants_total") == 0
