"""``stepup-authz coverage`` against real Envoys' /config_dump: the project's rendered config
is covered; the same config drifted (a route with ext_authz disabled, a second listener
whose filter has failure_mode_allow: true) is reported route by route and exits 1; an
unreachable admin address gets a message and exit 2. The in-service monitor reads the same
Envoys and exports its gauges."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from authz.config.policy_file import read_policy
from authz.config.settings import CoverageSettings
from authz.demo.stack import HOST, free_ports, http_ok
from authz.evidence.monitor import CoverageMonitor
from authz.ops.metrics import Metrics
from authz.render import EXT_AUTHZ, ext_authz_filter, render_envoy

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
POLICY = read_policy(ROOT / "examples" / "policy.yaml").policy


def envoy_bin() -> str:
    beside = Path(sys.executable).parent / "envoy"
    return str(beside) if beside.exists() else "envoy"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "stepup-authz"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "authz.cli"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, check=False)


@contextlib.contextmanager
def running_envoy(config: dict[str, Any], workdir: Path) -> Iterator[str]:
    """A real Envoy with this bootstrap; yields its admin URL; stopped by its own pid."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "envoy.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    admin = config["admin"]["address"]["socket_address"]
    url = f"http://{admin['address']}:{admin['port_value']}"
    log = (workdir / "envoy.log").open("wb")
    proc = subprocess.Popen(
        [
            envoy_bin(),
            "-c",
            str(cfg),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        process_group=0,
    )
    try:
        deadline = time.monotonic() + 30  # Envoy's own start-up is the subject of this wait
        while not http_ok(f"{url}/ready", expect=b"LIVE"):
            assert proc.poll() is None, (workdir / "envoy.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "envoy not ready"
            time.sleep(0.05)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        log.close()


def rendered(listen: int, admin: int) -> dict[str, Any]:
    return render_envoy(
        POLICY,
        hosts=["*"],
        listen_address=(HOST, listen),
        admin_address=(HOST, admin),
        authz_timeout="0.25s",
    )


def drifted(listen: int, listen2: int, admin: int) -> dict[str, Any]:
    """The rendered config after two drifts an operator could make by hand."""
    cfg = rendered(listen, admin)
    lst = cfg["static_resources"]["listeners"][0]
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    internal = copy.deepcopy(lst)  # before the bypass: it drifts on its own
    vhost = hcm["route_config"]["virtual_hosts"][-1]
    vhost["routes"].insert(
        1,
        {
            "name": "reports-bypass",
            "match": {"prefix": "/reports/"},
            "route": {"cluster": "upstream"},
            "typed_per_filter_config": {
                EXT_AUTHZ: {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3."
                    "ExtAuthzPerRoute",
                    "disabled": True,
                }
            },
        },
    )
    internal["name"] = "internal"
    internal["address"]["socket_address"]["port_value"] = listen2
    ih = internal["filter_chains"][0]["filters"][0]["typed_config"]
    ext_authz_filter(ih)["typed_config"]["failure_mode_allow"] = True
    ih["route_config"]["name"] = "internal-routes"
    cfg["static_resources"]["listeners"].append(internal)
    return cfg


@pytest.fixture(scope="module")
def envoys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    good_l, good_a, bad_l, bad_l2, bad_a = free_ports(5)
    base = tmp_path_factory.mktemp("coverage")
    with (
        running_envoy(rendered(good_l, good_a), base / "good") as good,
        running_envoy(drifted(bad_l, bad_l2, bad_a), base / "bad") as bad,
    ):
        yield good, bad


def test_a_rendered_config_is_covered(envoys: tuple[str, str]) -> None:
    good, _ = envoys
    res = cli("coverage", "--envoy-admin", good, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(res.stdout)
    statuses = {r["route"]: r["status"] for r in rep["routes"]}
    assert statuses.pop("stepup-endpoints") == "exempt"
    assert set(statuses.values()) == {"covered"} and len(statuses) == len(POLICY.routes) + 1
    assert all(r["timeout_ms"] == 250 and r["timeout_ok"] for r in rep["routes"] if r["filters"])
    assert all(r["status_on_error"] == 403 for r in rep["routes"] if r["filters"])


def test_a_disabled_route_and_a_fail_open_filter_are_reported(envoys: tuple[str, str]) -> None:
    _, bad = envoys
    res = cli("coverage", "--envoy-admin", bad, "--json")
    assert res.returncode == 1, res.stdout + res.stderr
    rep = json.loads(res.stdout)
    edge = {r["route"]: r for r in rep["routes"] if r["listener"] == "edge"}
    internal = [r for r in rep["routes"] if r["listener"] == "internal"]
    assert edge["reports-bypass"]["status"] == "uncovered"
    assert "disabled for this route" in edge["reports-bypass"]["reason"]
    assert {r["status"] for r in internal if r["route"] != "stepup-endpoints"} == {"fail-open"}
    assert all(r["failure_mode_allow"] for r in internal if r["filters"])
    assert rep["uncovered"] == 1 and rep["fail_open"] == len(POLICY.routes) + 1
    (fo,) = [f for f in rep["filters"] if f["failure_mode_allow"]]
    assert fo["listener"] == "internal"
    text = cli("coverage", "--envoy-admin", bad)
    assert text.returncode == 1
    assert "UNCOVERED   " in text.stdout and "reports-bypass" in text.stdout
    assert "FAIL-OPEN   filter envoy.filters.http.ext_authz" in text.stdout


def test_an_unreachable_admin_url_gets_a_message_and_exit_2(envoys: tuple[str, str]) -> None:
    good, _ = envoys
    (closed,) = free_ports(1)  # nothing listens there once free_ports returns
    res = cli("coverage", "--envoy-admin", good, f"http://{HOST}:{closed}")
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"http://{HOST}:{closed}/config_dump: unreachable" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    res = cli("coverage", "--envoy-admin", f"{HOST}:{closed}", "--timeout", "2")
    assert res.returncode == 2 and "unreachable" in res.stderr


async def test_the_monitor_reads_real_envoys(envoys: tuple[str, str]) -> None:
    good, bad = envoys
    m = Metrics(CollectorRegistry())
    mon = CoverageMonitor(
        CoverageSettings(envoy_admin_urls=(good, bad), interval_s=3600), m, deadline_ms=150
    )
    report = await mon.run_once()
    assert report.errors == []

    def gauge(name: str, envoy: str) -> float | None:
        return m.registry.get_sample_value(f"stepup_authz_{name}", {"envoy": envoy})

    assert (gauge("routes_uncovered", good), gauge("routes_fail_open", good)) == (0, 0)
    assert gauge("routes_uncovered", bad) == 1
    assert gauge("routes_fail_open", bad) == len(POLICY.routes) + 1
    assert gauge("coverage_unreachable", bad) == 0
