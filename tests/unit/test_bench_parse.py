"""The benchmark harness's parsing and statistics (bench/parse.py, bench/report.py,
bench/ratios.py, bench/growth.py's table) on captured tool output and made-up runs, and the
bench's own inputs (the requests bench.micro feeds the service, the floors' framing, the
growth policies) checked against the service's own parsers — no wrk, Envoy or Redis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import growth, ratios
from bench.parse import (
    decision_counts,
    delta,
    median,
    parse_envoy_stats,
    parse_h2load_log,
    parse_prometheus,
    parse_wrk,
    percentile,
    proc_cpu_ticks,
    ratio,
    system_busy_ticks,
    wrk_duration_s,
)
from bench.report import audit_ratios, markdown, summarize

REPO = Path(__file__).resolve().parents[2]

WRK_OK = """\
Running 2s test @ http://127.0.0.1:40123/accounts/1
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    10.52ms    1.20ms  25.10ms   90.00%
    Req/Sec     3.02k   100.00     3.20k    70.00%
  Latency Distribution
     50%   10.13ms
     75%   11.00ms
     90%   12.07ms
     99%   18.17ms
  6039 requests in 2.00s, 0.50MB read
Requests/sec:   3010.42
Transfer/sec:    256.00KB
"""

WRK_ERRORS = """\
Running 1s test @ http://127.0.0.1:1/
  1 threads and 8 connections
  Latency Distribution
     50%  850.00us
     75%    1.00ms
     90%    1.50s
     99%    2.00s
  100 requests in 1.00s, 10.00KB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 100
Requests/sec:    99.50
Transfer/sec:     10.00KB
"""


def test_parse_wrk_latency_and_rate() -> None:
    r = parse_wrk(WRK_OK)
    assert (r.requests, r.duration_s, r.rps) == (6039, 2.0, 3010.42)
    assert r.percentiles == pytest.approx({50: 0.01013, 75: 0.011, 90: 0.01207, 99: 0.01817})
    assert r.non_2xx_3xx == 0 and r.socket_errors == {} and r.errors == 0


def test_parse_wrk_counts_non_2xx_and_socket_errors_across_units() -> None:
    r = parse_wrk(WRK_ERRORS)
    assert r.percentiles[50] == pytest.approx(850e-6)
    assert r.percentiles[90] == pytest.approx(1.5)
    assert r.non_2xx_3xx == 100
    assert r.socket_errors == {"connect": 0, "read": 2, "write": 0, "timeout": 3}
    assert r.errors == 105


def test_parse_wrk_refuses_output_without_latency_distribution() -> None:
    with pytest.raises(ValueError, match="--latency"):
        parse_wrk(WRK_OK.replace("Latency Distribution", "Something else"))
    with pytest.raises(ValueError):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


@pytest.mark.parametrize(
    ("text", "seconds"), [("12.5us", 12.5e-6), ("3ms", 3e-3), ("1.00s", 1.0), ("2.00m", 120.0)]
)
def test_wrk_duration_units(text: str, seconds: float) -> None:
    assert wrk_duration_s(text) == pytest.approx(seconds)


def test_wrk_duration_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        wrk_duration_s("fast")


def test_parse_h2load_log_skips_blank_lines_and_extra_columns() -> None:
    text = (
        "1700000000000000\t200\t512\n\n1700000000000500\t401\t900\textra\n1700000000001000\t-1\t0\n"
    )
    rows = parse_h2load_log(text)
    assert [(r.status, r.latency_us) for r in rows] == [(200, 512), (401, 900), (-1, 0)]
    assert rows[1].start_us == 1700000000000500


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 99.9) == 100
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([7.0], 99) == 7.0
    assert percentile([3, 1, 2], 50) == 2  # unsorted input
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_median_and_ratio_ignore_missing_values() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([None]) is None
    assert ratio(5.0, 10.0) == 0.5
    assert ratio(None, 1.0) is None and ratio(1.0, 0.0) is None and ratio(1.0, None) is None


def test_proc_cpu_ticks_handles_spaces_and_parens_in_the_command_name() -> None:
    # fields: pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
    #         cmajflt utime stime ...
    rest = "S 1 1 1 0 -1 4194560 100 0 0 0 250 40 0 0 20 0 3 0 123 456 789"
    assert proc_cpu_ticks(f"4242 (envoy) {rest}") == 290
    assert proc_cpu_ticks(f"4242 (we ird) (x)) {rest}") == 290


def test_parse_envoy_stats_keeps_counters_and_skips_histograms() -> None:
    text = (
        "http.edge.downstream_rq_2xx: 120\nhttp.edge.ext_authz.ok: 118\n"
        "http.edge.downstream_rq_time: P0(nan,0) P25(nan,1)\nhttp.edge.gauge: -3\n"
    )
    stats = parse_envoy_stats(text)
    assert stats == {
        "http.edge.downstream_rq_2xx": 120,
        "http.edge.ext_authz.ok": 118,
        "http.edge.gauge": -3,
    }
    assert delta({"a": 5, "b": 2}, {"a": 3}) == {"a": 2, "b": 2}


def test_parse_prometheus_selects_one_metric_by_exact_name() -> None:
    text = (
        "# HELP stepup_authz_checks_total Check decisions.\n"
        'stepup_authz_checks_total{level="elevated",outcome="allow",reason="allowed"} 10.0\n'
        'stepup_authz_checks_total{level="elevated",outcome="step_up",reason="acr-insufficient"}'
        " 4.0\n"
        'stepup_authz_checks_created{level="elevated",outcome="allow",reason="allowed"} 1.7e9\n'
    )
    got = parse_prometheus(text, "stepup_authz_checks_total")
    assert got == {
        (("level", "elevated"), ("outcome", "allow"), ("reason", "allowed")): 10.0,
        (("level", "elevated"), ("outcome", "step_up"), ("reason", "acr-insufficient")): 4.0,
    }


def test_decision_counts_sum_over_levels() -> None:
    allow_e = (("level", "elevated"), ("outcome", "allow"), ("reason", "allowed"))
    allow_h = (("level", "high"), ("outcome", "allow"), ("reason", "allowed"))
    step = (("level", "elevated"), ("outcome", "step_up"), ("reason", "acr-insufficient"))
    before = {allow_e: 10.0, allow_h: 5.0, step: 1.0}
    after = {allow_e: 110.0, allow_h: 5.0, step: 1.0}  # only the elevated allow moved
    assert decision_counts(before, after) == {"outcome=allow,reason=allowed": 100}
    assert decision_counts({}, {allow_h: 2.0, allow_e: 3.0}) == {"outcome=allow,reason=allowed": 5}


def _run(sid: str, conc: int, rps: float, p99: float, **kw: Any) -> dict[str, Any]:
    return {
        "scenario": sid,
        "concurrency": conc,
        "rps": rps,
        "p50_ms": p99 / 4,
        "p90_ms": p99 / 2,
        "p99_ms": p99,
        "requests": int(rps),
        "errors": 0,
        "unexpected": 0,
        "cpu_ms_per_req": kw.get("cpu", {"envoy": 0.01}),
    }


def test_summarize_takes_medians_over_reps_and_ratios_at_the_same_concurrency() -> None:
    runs = [
        _run("0", 8, 70000, 0.2),
        _run("0", 8, 80000, 0.3),
        _run("0", 8, 75000, 0.4),
        _run("1", 8, 20000, 0.5),
        _run("1", 8, 25000, 0.6),
        _run("1", 8, 30000, 0.7),
        _run("2", 8, 3000, 4.0, cpu={"envoy": 0.1, "service": 0.4}),
        _run("2", 8, 2000, 9.0, cpu={"envoy": 0.2, "service": 0.3}),
        _run("2", 8, 2500, 5.0, cpu={"envoy": 0.3, "service": 0.5}),
        _run("2", 32, 3000, 20.0),
    ]
    runs[7]["unexpected"] = 2
    rows = {(r["scenario"], r["concurrency"]): r for r in summarize(runs)}
    s2 = rows[("2", 8)]
    assert (s2["reps"], s2["rps"], s2["p99_ms"]) == (3, 2500, 5.0)
    assert s2["cpu_ms_per_req"] == pytest.approx({"envoy": 0.2, "service": 0.4})
    assert s2["rps_vs_0"] == pytest.approx(2500 / 75000)
    assert s2["rps_vs_1"] == pytest.approx(2500 / 25000)
    assert s2["p99_vs_0"] == pytest.approx(5.0 / 0.3)
    assert s2["unexpected"] == 2
    # no scenario 0 at concurrency 32 in this run: no ratio rather than a wrong one
    assert rows[("2", 32)]["rps_vs_0"] is None
    assert [(r["scenario"], r["concurrency"]) for r in summarize(runs)] == [
        ("0", 8),
        ("1", 8),
        ("2", 8),
        ("2", 32),
    ]


def test_markdown_renders_every_row_and_marks_missing_values() -> None:
    runs = [_run("0", 1, 18000, 0.19), _run("2", 1, 1300, 2.1, cpu={"service": 0.5})]
    doc = {
        "meta": {
            "started": "T",
            "host": {"cpus": 2, "cpu_model": "cpu"},
            "versions": {"envoy": "1.40.0", "python": "3.11"},
            "mode": "quick",
            "reps": 1,
            "duration_s": 2.0,
        },
        "scenarios": [{"id": "0", "title": "ceiling"}, {"id": "2", "title": "allow"}],
        "summary": summarize(runs),
        "skipped": [{"id": "5", "title": "http", "reason": "not yet"}],
    }
    md = markdown(doc)
    assert "| 0 ceiling | 1 | 18,000 | 1.000 | - |" in md
    assert "| 2 allow | 1 | 1,300 | 0.072 |" in md
    assert "Not run: 5 http (not yet)." in md


def test_system_busy_ticks_excludes_idle_and_iowait() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    text = "cpu  100 5 50 9000 40 1 2 3 7 0\ncpu0 50 2 25 4500 20 0 1 1 3 0\nintr 1 2\n"
    assert system_busy_ticks(text) == 100 + 5 + 50 + 1 + 2 + 3
    with pytest.raises(ValueError):
        system_busy_ticks("intr 1 2\n")


def test_audit_ratio_pairs_scenario_4_with_scenario_2_per_repetition() -> None:
    runs = [
        {**_run(sid, 32, rps, 1.0), "rep": rep}
        for sid, rep, rps in [
            ("2", 0, 2000),
            ("4", 0, 1800),
            ("2", 1, 2200),
            ("4", 1, 1700),
            ("2", 2, 2100),
            ("4", 2, 1900),
            ("2", -1, 99),
            ("4", -1, 1),
        ]
    ]  # rep -1: warm-up
    runs.append({**_run("2", 8, 1000, 1.0), "rep": 0})  # no scenario 4 at 8: no row
    (row,) = audit_ratios(runs)
    assert row["concurrency"] == 32
    assert (row["on_rps"], row["off_rps"]) == (1800, 2100)
    assert row["ratio"] == pytest.approx(1800 / 2100)
    assert row["paired"] == pytest.approx([0.9, 1700 / 2200, 1900 / 2100])
    assert row["paired_median"] == pytest.approx(0.9)
    assert audit_ratios([r for r in runs if r["scenario"] == "2"]) == []


# -- issue 18: floors, jwt_authn, targets, bench.micro ------------------------------------------
SCENARIOS = [
    {"id": "1", "title": "jwt", "role": "reference", "mode": None},
    {"id": "2", "title": "grpc allow", "role": "service", "mode": "grpc"},
    {"id": "5", "title": "http allow", "role": "service", "mode": "http"},
    {"id": "6", "title": "grpc floor", "role": "floor", "mode": "grpc"},
    {"id": "7", "title": "http floor", "role": "floor", "mode": "http"},
]


def _rep(sid: str, conc: int, rep: int, rps: float, p99: float, cpu: dict[str, float]) -> Any:
    return {**_run(sid, conc, rps, p99, cpu=cpu), "rep": rep}


def _floor_runs() -> list[dict[str, Any]]:
    # service CPU in ms per request; two repetitions, interleaved
    return [
        _rep("1", 32, 0, 10000, 2.0, {"envoy": 0.080}),
        _rep("1", 32, 1, 12000, 3.0, {"envoy": 0.060}),
        _rep("2", 32, 0, 1500, 20.0, {"envoy": 0.2, "service": 0.600, "redis": 0.05}),
        _rep("2", 32, 1, 1700, 30.0, {"envoy": 0.2, "service": 0.700, "redis": 0.05}),
        _rep("6", 32, 0, 4000, 10.0, {"envoy": 0.2, "service": 0.250}),
        _rep("6", 32, 1, 4200, 10.0, {"envoy": 0.2, "service": 0.350}),
        _rep("5", 32, 0, 5000, 8.0, {"envoy": 0.1, "service": 0.150, "redis": 0.02}),
        _rep("5", 32, 1, 5400, 6.0, {"envoy": 0.1, "service": 0.170, "redis": 0.02}),
        _rep("7", 32, 0, 13000, 4.0, {"envoy": 0.1, "service": 0.010}),
        _rep("7", 32, 1, 13000, 4.0, {"envoy": 0.1, "service": 0.010}),
        _rep("5", 8, 0, 4000, 3.0, {"envoy": 0.1, "service": 0.2}),  # no floor at c=8
        _rep("2", 32, -1, 1, 999.0, {"service": 99.0}),  # a warm-up: never counted
    ]


def test_floor_ratios_compare_each_service_cell_with_the_floor_of_its_mode() -> None:
    rows = {
        (r["scenario"], r["concurrency"]): r for r in ratios.floor_ratios(_floor_runs(), SCENARIOS)
    }
    assert set(rows) == {("2", 32), ("5", 32), ("5", 8)}  # service cells only
    g = rows[("2", 32)]
    assert g["floor"] == "6" and g["mode"] == "grpc"
    assert g["service_us"] == pytest.approx(650) and g["floor_us"] == pytest.approx(300)
    assert g["cpu_x_floor"] == pytest.approx(650 / 300)
    assert g["cpu_x_floor_paired"] == pytest.approx((0.6 / 0.25 + 0.7 / 0.35) / 2)
    assert g["above_floor_us"] == pytest.approx(350)
    assert g["rps_x_floor"] == pytest.approx(1600 / 4100)
    assert g["rps_x_jwt"] == pytest.approx(1600 / 11000)
    assert g["p99_x_jwt"] == pytest.approx(25.0 / 2.5)
    # the whole stack's CPU per request (envoy + service + redis) against jwt's Envoy
    assert g["total_cpu_us"] == pytest.approx(900) and g["total_cpu_x_jwt"] == pytest.approx(
        12.857, rel=1e-3
    )
    h = rows[("5", 32)]
    assert h["floor"] == "7" and h["cpu_x_floor"] == pytest.approx(16.0)
    # no floor ran at c=8: no ratio rather than one against another concurrency
    assert rows[("5", 8)]["floor"] is None and rows[("5", 8)]["cpu_x_floor"] is None


def test_fixed_rate_p99_against_jwt_pairs_repetitions() -> None:
    runs = [
        {"scenario": sid, "rep": rep, "p99_ms": p99}
        for sid, rep, p99 in [("1", 0, 1.0), ("5", 0, 3.0), ("1", 1, 2.0), ("5", 1, 3.0)]
    ]
    (row,) = ratios.fixed_vs_reference(runs, SCENARIOS)  # jwt itself has no mode: no row
    assert row["scenario"] == "5"
    assert row["p99_x_jwt"] == pytest.approx(3.0 / 1.5)
    assert row["p99_x_jwt_paired"] == pytest.approx((3.0 + 1.5) / 2)


def test_micro_comparison_and_the_targets() -> None:
    runs = _floor_runs()
    summary = summarize([r for r in runs if r["rep"] >= 0])
    micro = {"concurrency": 32, "n": 100, "reps": 2, "http": {"cpu_us_per_check": 140.0}}
    cmp = ratios.micro_comparison(micro, summary)
    http = cmp["modes"]["http"]
    assert http["in_situ_us"] == pytest.approx(160) and http["in_situ_scenario"] == "5"
    assert http["micro_x_in_situ"] == pytest.approx(140 / 160)
    assert http["within_tolerance"] is True
    assert http["micro_x_above_floor"] == pytest.approx(140 / 150)
    assert "grpc" not in cmp["modes"]
    doc = {
        "summary": summary,
        "floors": ratios.floor_ratios(runs, SCENARIOS),
        "audit": [],
        "micro": cmp,
        "fixed_rate": {
            "config": {"total_rps": 1000},
            "vs_jwt": [{"scenario": "5", "p99_x_jwt": 1.5, "p99_x_jwt_paired": 2.5}],
        },
    }
    got = {t["target"]: t for t in ratios.targets(doc)}
    cpu = got["HTTP mode, allow via grant: service CPU per check (us)"]
    assert (cpu["measured"], cpu["met"], cpu["where"]) == (
        pytest.approx(160),
        False,
        "scenario 5, c=32",
    )
    assert got["HTTP mode: service CPU x the HTTP floor"]["measured"] == pytest.approx(16.0)
    assert got["gRPC mode: service CPU x the grpc.aio floor"]["met"] is False
    fixed = got["HTTP mode: fixed-rate p99 x jwt_authn's p99 (median of per-repetition ratios)"]
    assert (fixed["measured"], fixed["met"]) == (2.5, False)  # paired, not 1.5 of the medians
    assert got["audit before access on/off (req/s)"]["met"] is None  # not measured
    micro_t = got["bench.micro (HTTP) / in-situ service CPU: |ratio - 1|"]
    assert micro_t["measured"] == pytest.approx(0.125) and micro_t["met"] is True


def test_markdown_shows_targets_floors_and_micro() -> None:
    runs = [r for r in _floor_runs() if r["rep"] >= 0]
    summary = summarize(runs)
    micro = ratios.micro_comparison(
        {"concurrency": 32, "n": 100, "reps": 2, "http": {"cpu_us_per_check": 140.0}}, summary
    )
    doc: dict[str, Any] = {
        "meta": {
            "started": "T",
            "host": {"cpus": 2, "cpu_model": "cpu"},
            "versions": {"envoy": "1.40.0", "python": "3.11"},
            "mode": "full",
            "reps": 2,
            "duration_s": 8.0,
            "command": "python -m bench.run --scenarios 1,2,5,6,7",
        },
        "scenarios": SCENARIOS,
        "summary": summary,
        "floors": ratios.floor_ratios(runs, SCENARIOS),
        "micro": micro,
    }
    doc["targets"] = ratios.targets(doc)
    md = markdown(doc)
    assert "`python -m bench.run --scenarios 1,2,5,6,7`" in md
    assert (
        "| HTTP mode: service CPU x the HTTP floor | scenario 5 / 7, c=32 | 16.00 | <= 3.3 "
        "| **no** |" in md
    )
    assert "| 5 http allow | 32 | 160 | 7 | 10 | 16.00 | 16.00 | 150 |" in md
    assert "| http | 140 | 160 (5) | 0.88 | 10 | 150 | 0.93 |" in md
    assert (
        "| HTTP mode: fixed-rate p99 x jwt_authn's p99 (median of per-repetition ratios) | - "
        "| - | <= 2 | not measured |" in md
    )


# -- what bench.micro and the floors feed the service -------------------------------------------
def test_micro_requests_are_what_the_service_accepts() -> None:
    from envoy.service.auth.v3 import external_auth_pb2

    from authz.check.http_server import parse_head
    from authz.check.request import attributes_from_check, attributes_from_http
    from bench.inproc import grpc_check_request, http_check_head

    raw = http_check_head("a.b.c")
    assert raw.endswith(b"\r\n\r\n") and raw.count(b"\r\n\r\n") == 1
    method, target, headers, keep_alive = parse_head(raw[:-4].decode("latin-1"), 64)
    attrs = attributes_from_http(method, target, headers, path_prefix="/check")
    assert (attrs.method, attrs.path, attrs.host, str(attrs.source_ip)) == (
        "GET",
        "/accounts/1",
        "127.0.0.1",
        "127.0.0.1",
    )
    assert keep_alive and attrs.headers["authorization"] == "Bearer a.b.c"
    req = external_auth_pb2.CheckRequest.FromString(grpc_check_request("a.b.c", "/wires/1"))
    attrs = attributes_from_check(req)
    assert (attrs.method, attrs.path, attrs.host, str(attrs.source_ip)) == (
        "GET",
        "/wires/1",
        "127.0.0.1",
        "127.0.0.1",
    )
    assert attrs.headers["authorization"] == "Bearer a.b.c"


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_http_floor_answers_each_framed_request_once(tmp_path: Any) -> None:
    from bench.floors import _HttpConn, _Recorder

    record = tmp_path / "first.request"
    conn = _HttpConn(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", _Recorder(record))
    t = _Transport()
    conn.connection_made(t)  # type: ignore[arg-type]
    head = b"GET /check/a HTTP/1.1\r\nhost: x\r\n\r\n"
    conn.data_received(head[:10])
    assert t.written == []  # not a whole head yet
    conn.data_received(head[10:] + head + head[:5])  # the rest, one more, and a part
    assert len(t.written) == 2
    conn.data_received(head[5:])
    assert len(t.written) == 3 and conn.buf == bytearray()
    assert record.read_bytes() == head  # the first request only


# -- bench.growth -----------------------------------------------------------------------------
def test_growth_policies_load_and_match_where_they_say() -> None:
    from authz.core.attributes import RequestAttributes
    from authz.core.decision import CheckInputs, Outcome, decide
    from authz.core.policy import load_policy

    docs = growth.policies()
    first, last = load_policy(docs["routes-first"]), load_policy(docs["routes-last"])
    assert len(first.routes) == len(last.routes) == 1000
    kinds = {("prefix" if r.prefix else "exact" if r.exact else "regex") for r in last.routes}
    assert kinds == {"prefix", "exact", "regex"}
    assert any(r.host for r in last.routes) and any(r.methods for r in last.routes)
    for policy, index in ((first, 0), (last, 999)):
        route = policy.route_for("127.0.0.1", "GET", "/accounts/1")
        assert route is not None and route.index == index and route.level.name == "elevated"
    rules = load_policy(docs["rules-100"])
    assert len(rules.rules) == 100 and load_policy(docs["rules-0"]).rules == ()
    import ipaddress
    from types import MappingProxyType

    attrs = RequestAttributes(
        method="GET",
        scheme="http",
        host="127.0.0.1",
        path="/accounts/1",
        query="",
        headers=MappingProxyType({}),
        source_ip=ipaddress.ip_address("127.0.0.1"),
        context_extensions=MappingProxyType({}),
        request_id="r",
    )
    # the service's own pipeline, for a check without a token or device: no rule fires
    # (a deny would say so before the missing sign-in does), and the level is not raised
    d = decide(rules, attrs, CheckInputs(now=0))
    assert d.fired == () and d.outcome is Outcome.LOGIN
    assert d.level is not None and d.level.name == "elevated"


def test_growth_summary_ratios_to_each_dimensions_baseline() -> None:
    cases = growth.cases([1000, 100_000])
    ids = [c.id for c in cases]
    assert "users-100000-default-cache" in ids and "users-1000" in ids
    big = next(c for c in cases if c.id == "users-100000")
    assert big.token_cache is not None and big.token_cache >= 100_000
    # the worst case: no check finds its user's sighting fresh (the clock steps past it)
    from authz.check.authorizer import _LESSON_REFRESH_S

    assert big.first_in_interval and growth.CLOCK_STEP_S > _LESSON_REFRESH_S
    assert not next(c for c in cases if c.id == "users-1000").first_in_interval
    back = next(c for c in cases if c.id == "users-100000-returning")
    assert back.returning == growth.RETURNING_WINDOW and not back.first_in_interval
    runs = [
        {
            "case": cid,
            "rep": rep,
            "checks": 10,
            "not_allowed": 0,
            "cpu_us_per_check": cpu,
            "redis_us_per_check": red,
        }
        for cid, rep, cpu, red in [
            ("users-1", 0, 200.0, 20.0),
            ("users-1", 1, 220.0, 22.0),
            ("users-100000", 0, 300.0, 50.0),
            ("users-100000", 1, 330.0, 55.0),
        ]
    ]
    rows = {r["case"]: r for r in growth.summarize(runs, cases)}
    assert rows["users-1"]["cpu_x_baseline"] == pytest.approx(1.0)
    assert rows["users-100000"]["cpu_us_per_check"] == pytest.approx(315)
    assert rows["users-100000"]["cpu_x_baseline"] == pytest.approx(315 / 210)
    assert rows["users-100000"]["redis_x_baseline"] == pytest.approx(52.5 / 21)
    assert rows["routes-last"]["reps"] == 0 and rows["routes-last"]["cpu_x_baseline"] is None
    doc = {
        "meta": {
            "started": "T",
            "host": {"cpus": 2, "cpu_model": "cpu"},
            "python": "3.11",
            "reps": 2,
            "n": 10,
            "concurrency": 32,
            "command": "python -m bench.growth",
            "wall_s": 1.0,
        },
        "summary": list(rows.values()),
    }
    md = growth.markdown(doc)
    assert (
        "| distinct users | 100,000 users (token cache holds them all) | 315 | 1.50 | 52.5 "
        "| 2.50 | 20 | 0 |" in md
    )
    assert "| policy size | 1,000 routes, match last | - | - | - | - | 0 | 0 |" in md


def test_growth_dimension_selects_its_cases_with_their_baseline() -> None:
    import argparse

    ns = argparse.Namespace(users=[1000, 100_000], dimension=["users"])
    picked = growth.selected(ns)
    assert {c.dimension for c in picked} == {"distinct users"}
    assert {c.baseline for c in picked} - {""} <= {c.id for c in picked}
    ns.dimension = None
    assert len(growth.selected(ns)) == len(growth.cases([1000, 100_000]))


def test_the_bench_stack_builds_over_the_demo_stack(tmp_path: Path) -> None:
    """bench.stackctl.BenchStack subclasses the demo Stack: its keyring file and settings
    build without starting anything (a clash with the Stack's own attributes fails here,
    not in the middle of `make bench`)."""
    from bench.stackctl import BenchStack

    stack = BenchStack(tmp_path / "stack", REPO / "examples" / "policy.yaml", "INFO")
    assert stack.bench_crypto_key.name == "crypto-bench.key"
    assert stack.settings()["crypto"]["keys"] == {"bench": str(stack.bench_crypto_key)}


def test_the_bench_stacks_http_envoy_and_http_listener_share_one_port(tmp_path: Path) -> None:
    """Scenario 5's Envoy sends its checks to ``check_port``; the service's HTTP listener must
    listen there (the demo Stack assigns check_port itself, after the bench's own choice)."""
    from bench.stackctl import BenchStack

    stack = BenchStack(
        tmp_path / "stack", REPO / "examples" / "policy.yaml", "INFO", http_authz=True
    )
    assert stack.settings()["http_authz"] == {"enabled": True, "port": stack.check_port}
    plain = BenchStack(tmp_path / "plain", REPO / "examples" / "policy.yaml", "INFO")
    assert "http_authz" not in plain.settings()


def test_the_awaiting_floor_runs_by_default_and_is_not_the_floor_of_the_ratios() -> None:
    """Scenario 6r (grpc.aio awaiting one Redis GET) runs in every full run, and the
    targets' ratios keep the no-op floor (6) as the gRPC floor."""
    from bench.scenarios import BY_ID, DEFAULT_IDS, FLOOR_OF

    s = BY_ID["6r"]
    assert (s.role, s.mode, s.target) == ("floor-await", "grpc", "floor-grpc-await")
    assert "6r" in DEFAULT_IDS
    assert FLOOR_OF == {"grpc": "6", "http": "7"}


@pytest.mark.parametrize(
    "argv",
    [
        ["http", "--await-redis", "redis://x"],  # the HTTP floor awaits nothing
        ["grpc", "--spin-us", "5"],  # the spin models a decision after the Redis reply
    ],
)
def test_the_floors_refuse_options_that_do_not_fit(tmp_path: Path, argv: list[str]) -> None:
    from bench import floors

    answer = tmp_path / "a"
    answer.write_bytes(b"")
    mode, *rest = argv
    with pytest.raises(SystemExit) as e:
        floors.main([mode, "--port", "1", "--answer", str(answer), *rest])
    assert e.value.code == 2


def test_the_spinning_floor_runs_only_when_asked_for() -> None:
    from bench.scenarios import BY_ID, DEFAULT_IDS, SPIN_US

    assert BY_ID["6s"].role == "floor-await" and "6s" not in DEFAULT_IDS
    assert (BY_ID["6s"].spin_us, BY_ID["6r"].spin_us) == (SPIN_US, 0)
