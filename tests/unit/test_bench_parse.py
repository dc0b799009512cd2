"""The benchmark harness's parsing and statistics (bench/parse.py, bench/report.py) on
captured tool output — no wrk, Envoy or Redis needed."""

from __future__ import annotations

from typing import Any

import pytest

from bench.parse import (
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
