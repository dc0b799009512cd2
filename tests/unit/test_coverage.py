"""Coverage of a config dump: the rendered config is covered; every way a route can escape
ext_authz or fail open is named. (Real Envoys: tests/e2e/test_coverage_e2e.py.)"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from authz.config.policy_file import read_policy
from authz.config.settings import CoverageSettings, Settings
from authz.evidence.coverage import CoverageError, assess_dump, check_mesh, duration_ms
from authz.evidence.incident import select_incident
from authz.evidence.monitor import CoverageMonitor, exempt_prefixes, service_deadline_ms
from authz.ops.metrics import Metrics
from authz.render import EXT_AUTHZ, ext_authz_filter, render_envoy

ROOT = Path(__file__).resolve().parents[2]
POLICY = read_policy(ROOT / "examples" / "policy.yaml").policy
LISTENERS = "type.googleapis.com/envoy.admin.v3.ListenersConfigDump"
ROUTES = "type.googleapis.com/envoy.admin.v3.RoutesConfigDump"


def dump_of(bootstrap: dict[str, Any]) -> dict[str, Any]:
    """The admin API's shape for a static bootstrap (what /config_dump returns)."""
    listeners = [{"listener": lst} for lst in bootstrap["static_resources"]["listeners"]]
    return {"configs": [{"@type": LISTENERS, "static_listeners": listeners}]}


def hcm(dump: dict[str, Any]) -> dict[str, Any]:
    lst = dump["configs"][0]["static_listeners"][0]["listener"]
    out: dict[str, Any] = lst["filter_chains"][0]["filters"][0]["typed_config"]
    return out


def authz_cfg(dump: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = ext_authz_filter(hcm(dump))["typed_config"]
    return out


def routes(dump: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = hcm(dump)["route_config"]["virtual_hosts"][-1]["routes"]
    return out


def assess(dump: dict[str, Any], deadline_ms: int = 150) -> dict[str, Any]:
    rs, _, _ = assess_dump("e", dump, deadline_ms=deadline_ms)
    return {f"{r.virtual_host}/{r.route}": r for r in rs}


RENDERED = dump_of(render_envoy(POLICY, hosts=["*"]))


def test_the_rendered_config_is_covered() -> None:
    got = assess(RENDERED)
    assert got and {r.status for r in got.values()} == {"covered", "exempt"}
    assert [k for k, r in got.items() if r.status == "exempt"] == [
        f"{vh}/stepup-endpoints" for vh in ("any-host",)
    ]
    r = got["any-host/policy-2-elevated"]
    assert (r.failure_mode_allow, r.timeout_ms, r.timeout_ok, r.status_on_error) == (
        False,
        250,
        True,
        403,
    )


def test_a_route_with_ext_authz_disabled_is_uncovered() -> None:
    d = copy.deepcopy(RENDERED)
    routes(d)[2]["typed_per_filter_config"][EXT_AUTHZ] = {
        "@type": "x/ExtAuthzPerRoute",
        "disabled": True,
    }
    got = assess(d)
    r = got["any-host/policy-1-public"]
    assert r.status == "uncovered" and "disabled for this route" in r.reason


def test_virtual_host_disable_and_route_override_resolve_most_specific_first() -> None:
    d = copy.deepcopy(RENDERED)
    vh = hcm(d)["route_config"]["virtual_hosts"][-1]
    vh["typed_per_filter_config"] = {EXT_AUTHZ: {"@type": "x/ExtAuthzPerRoute", "disabled": True}}
    bare = {"name": "bare", "match": {"prefix": "/bare/"}, "route": {"cluster": "upstream"}}
    vh["routes"].insert(1, bare)
    got = assess(d)
    assert got["any-host/bare"].status == "uncovered"  # the vhost's disable applies
    assert got["any-host/policy-2-elevated"].status == "covered"  # its own config wins


def test_fail_open_filter_makes_its_routes_fail_open() -> None:
    d = copy.deepcopy(RENDERED)
    authz_cfg(d)["failure_mode_allow"] = True
    got = assess(d)
    assert {r.status for k, r in got.items() if "stepup-endpoints" not in k} == {"fail-open"}


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda h: h["http_filters"].reverse(), "after the router"),
        (
            lambda h: ext_authz_filter(h)["typed_config"].update(
                filter_enabled={"default_value": {"numerator": 50}}
            ),
            "sampled",
        ),
        (lambda h: ext_authz_filter(h).update(disabled=True), "disabled by default"),
        (lambda h: h["http_filters"].remove(ext_authz_filter(h)), "no ext_authz filter"),
    ],
)
def test_every_way_out_of_the_check_is_named(change: Any, why: str) -> None:
    d = copy.deepcopy(RENDERED)
    # a route with no per-route config, so "disabled by default" is not re-enabled by one
    routes(d).insert(1, {"name": "bare", "match": {"prefix": "/bare/"}, "route": {"cluster": "u"}})
    change(hcm(d))
    r = assess(d)["any-host/bare"]
    assert r.status == "uncovered" and why in r.reason, r.reason


def test_weighted_cluster_disable_and_missing_route_table() -> None:
    d = copy.deepcopy(RENDERED)
    r = routes(d)[3]
    r["route"] = {
        "weighted_clusters": {
            "clusters": [
                {"name": "a", "weight": 50},
                {
                    "name": "b",
                    "weight": 50,
                    "typed_per_filter_config": {EXT_AUTHZ: {"disabled": True}},
                },
            ]
        }
    }
    got = assess(d)["any-host/policy-2-elevated"]
    assert got.status == "uncovered" and "weighted cluster(s) b" in got.reason
    d = copy.deepcopy(RENDERED)
    del hcm(d)["route_config"]
    hcm(d)["rds"] = {"route_config_name": "gone"}
    (only,) = assess(d).values()
    assert only.status == "uncovered" and "'gone' is not in the config dump" in only.reason


def test_rds_routes_and_a_short_timeout_are_reported() -> None:
    d = copy.deepcopy(RENDERED)
    table = hcm(d).pop("route_config")
    hcm(d)["rds"] = {"route_config_name": table["name"]}
    d["configs"].append({"@type": ROUTES, "dynamic_route_configs": [{"route_config": table}]})
    authz_cfg(d)["grpc_service"]["timeout"] = "0.100s"
    authz_cfg(d)["status_on_error"] = {"code": "ServiceUnavailable"}
    r = assess(d, deadline_ms=150)["any-host/policy-2-elevated"]
    assert (r.status, r.timeout_ms, r.timeout_ok, r.status_on_error) == (
        "covered",
        100,
        False,
        503,
    )
    assert duration_ms("0.25s") == 250 and duration_ms("bad") is None


def test_service_deadline_and_exempt_prefix_come_from_the_settings() -> None:
    s = Settings.model_validate(
        {
            "policy_file": "p.yaml",
            "oidc": {"issuer": "https://i", "client_id": "c", "audience": "a"},
            "redis": {"deadline_ms": 40},
            "stepup": {"path_prefix": "/_auth"},
        }
    )
    assert service_deadline_ms(s) == 40 + 100 and exempt_prefixes(s) == ("/_auth/",)
    off = s.model_copy(update={"audit": s.audit.model_copy(update={"durable_level": None})})
    assert service_deadline_ms(off) == 40


def _fetcher(dumps: dict[str, Any]) -> Any:
    def fetch(url: str, timeout: float) -> Any:
        if url not in dumps:
            raise CoverageError(f"{url}/config_dump: unreachable (refused)")
        return dumps[url]

    return fetch


def sample(m: Metrics, name: str, envoy: str) -> float | None:
    return m.registry.get_sample_value(f"stepup_authz_{name}", {"envoy": envoy})


async def test_monitor_exports_gauges_and_keeps_counts_of_an_unread_envoy() -> None:
    bad = copy.deepcopy(RENDERED)
    authz_cfg(bad)["failure_mode_allow"] = True
    routes(bad)[2]["typed_per_filter_config"] = {EXT_AUTHZ: {"disabled": True}}
    dumps = {"http://a": RENDERED, "http://b": bad}
    m = Metrics(CollectorRegistry())
    mon = CoverageMonitor(
        CoverageSettings(envoy_admin_urls=("http://a", "http://b"), interval_s=3600),
        m,
        deadline_ms=150,
        fetch=_fetcher(dumps),
    )
    mon.start()
    await asyncio.wait_for(mon.ran.wait(), 10)  # the first run starts at once
    await mon.aclose()
    assert sample(m, "routes_uncovered", "http://a") == 0
    assert sample(m, "routes_fail_open", "http://a") == 0
    assert sample(m, "routes_uncovered", "http://b") == 1
    n_routes = len(routes(bad))
    assert sample(m, "routes_fail_open", "http://b") == n_routes - 2  # less exempt, uncovered
    del dumps["http://b"]
    report = await mon.run_once()
    assert report.errors and sample(m, "coverage_unreachable", "http://b") == 1
    assert sample(m, "routes_uncovered", "http://b") == 1  # last known, not "fixed"
    assert sample(m, "coverage_unreachable", "http://a") == 0


def test_check_mesh_reports_unreachable_and_exit_codes() -> None:
    rep = check_mesh(["http://x"], deadline_ms=150, fetch=_fetcher({}))
    assert rep.exit_code == 2 and "unreachable" in rep.errors[0]["error"]
    rep = check_mesh(["http://a"], deadline_ms=150, fetch=_fetcher({"http://a": RENDERED}))
    assert rep.exit_code == 0 and rep.ok


def test_incident_selects_a_user_or_a_session_and_its_user_wide_revocations() -> None:
    recs: list[dict[str, Any]] = [
        {"ts_ms": 10, "seq": 1, "user": "u1", "session": "s1", "type": "access.allowed"},
        {"ts_ms": 11, "seq": 2, "user": "u1", "session": "s2", "type": "access.allowed"},
        {"ts_ms": 12, "seq": 3, "user": "u2", "session": "s3", "type": "access.allowed"},
        {"ts_ms": 13, "seq": 4, "user": "u1", "session": "*", "type": "grant.revoked"},
        {"ts_ms": 99, "seq": 5, "user": "u1", "session": "s1", "type": "access.allowed"},
    ]
    by_user = select_incident(recs, since_ms=0, until_ms=50, user="u1")
    assert [r["seq"] for r in by_user] == [1, 2, 4]
    by_session = select_incident(recs, since_ms=0, until_ms=50, session="s1")
    assert [r["seq"] for r in by_session] == [1, 4]
    with pytest.raises(ValueError):
        select_incident(recs, since_ms=0, until_ms=1)
