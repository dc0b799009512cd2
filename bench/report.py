"""Aggregation (medians over repetitions, ratios to scenarios 0 and 1) and the outputs:
latest.json, latest.md (with bench/ratios.py's floors, targets and bench.micro comparison)
and latest.png. Aggregation and Markdown are pure functions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.parse import median, ratio, scenario_order
from bench.ratios import AUDIT_TARGET, MICRO_TOLERANCE, TARGET_CONCURRENCY

_METRICS = ("rps", "p50_ms", "p90_ms", "p99_ms")
_PROCS = ("envoy", "service", "redis", "exporter")


def summarize(runs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, concurrency): medians of the repetitions, summed error counts,
    and ratios to scenario 0 and 1 at the same concurrency (when they ran)."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["scenario"], run["concurrency"]), []).append(run)
    rows: list[dict[str, Any]] = []
    for (sid, conc), rs in groups.items():
        row: dict[str, Any] = {"scenario": sid, "concurrency": conc, "reps": len(rs)}
        for m in _METRICS:
            row[m] = median(r[m] for r in rs)
        row["cpu_ms_per_req"] = {
            p: median(r["cpu_ms_per_req"].get(p) for r in rs)
            for p in _PROCS
            if any(p in r["cpu_ms_per_req"] for r in rs)
        }
        row["errors"] = sum(r["errors"] for r in rs)
        row["unexpected"] = sum(r["unexpected"] for r in rs)
        row["requests"] = sum(r["requests"] for r in rs)
        row["foreign_cores_max"] = max((r.get("foreign_cores", 0.0) for r in rs), default=0.0)
        rows.append(row)
    index = {(r["scenario"], r["concurrency"]): r for r in rows}
    for row in rows:
        for base in ("0", "1"):
            ref = index.get((base, row["concurrency"]))
            row[f"rps_vs_{base}"] = ratio(row["rps"], ref["rps"] if ref else None)
            row[f"p99_vs_{base}"] = ratio(row["p99_ms"], ref["p99_ms"] if ref else None)
    rows.sort(key=lambda r: (scenario_order(r["scenario"]), r["concurrency"]))
    return rows


def audit_ratios(runs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Audit on / audit off: scenario 4 (allow with a durable audit record) over scenario 2
    (the same allow path, no record) at each concurrency: the ratio of the median req/s,
    and the ratio within each repetition (the two ran back to back, so they share the
    host's noise)."""
    by: dict[tuple[str, int, int], float] = {}
    for r in runs:
        if r["scenario"] in ("2", "4") and r["rep"] >= 0:
            by[(r["scenario"], r["concurrency"], r["rep"])] = r["rps"]
    out = []
    for conc in sorted({c for _, c, _ in by}):
        on = [v for (s, c, _), v in sorted(by.items()) if s == "4" and c == conc]
        off = [v for (s, c, _), v in sorted(by.items()) if s == "2" and c == conc]
        paired = [
            by[("4", conc, rep)] / by[("2", conc, rep)]
            for (s, c, rep) in sorted(by)
            if s == "2" and c == conc and ("4", conc, rep) in by and by[("2", conc, rep)]
        ]
        if on and off:
            out.append(
                {
                    "concurrency": conc,
                    "on_rps": median(on),
                    "off_rps": median(off),
                    "ratio": ratio(median(on), median(off)),
                    "paired": paired,
                    "paired_median": median(paired) if paired else None,
                    "target": AUDIT_TARGET,
                }
            )
    return out


def summarize_fixed(runs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["scenario"], []).append(run)
    rows = []
    for sid, rs in groups.items():
        row: dict[str, Any] = {"scenario": sid, "reps": len(rs), "target_rps": rs[0]["target_rps"]}
        for m in ("achieved_rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"):
            row[m] = median(r[m] for r in rs)
        row["cpu_ms_per_req"] = {
            p: median(r["cpu_ms_per_req"].get(p) for r in rs)
            for p in _PROCS
            if any(p in r["cpu_ms_per_req"] for r in rs)
        }
        row["unexpected"] = sum(r["unexpected"] for r in rs)
        row["requests"] = sum(r["requests"] for r in rs)
        row["foreign_cores_max"] = max((r.get("foreign_cores", 0.0) for r in rs), default=0.0)
        rows.append(row)
    index = {r["scenario"]: r for r in rows}
    for row in rows:
        for base in ("0", "1"):
            ref = index.get(base)
            row[f"p99_vs_{base}"] = ratio(row["p99_ms"], ref["p99_ms"] if ref else None)
    rows.sort(key=lambda r: scenario_order(r["scenario"]))
    return rows


NOISY_CORES = 0.25


def _noise(row: Mapping[str, Any]) -> str:
    v = float(row.get("foreign_cores_max", 0.0))
    return f"{v:.2f}" + (" !" if v > NOISY_CORES else "")


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(doc: Mapping[str, Any]) -> str:
    """The Markdown report: the closed-loop table, the fixed-rate table, and the run facts."""
    names = {s["id"]: s["title"] for s in doc["scenarios"]}
    meta = doc["meta"]
    out = [
        "# stepup-authz benchmark — latest run",
        "",
        f"{meta['started']} · {meta['host']['cpus']} CPUs ({meta['host']['cpu_model']}) · "
        f"Envoy {meta['versions']['envoy']} · Python {meta['versions']['python']} · "
        f"mode `{meta['mode']}` · {meta['reps']} repetitions x {meta['duration_s']} s per cell, "
        f"interleaved; medians shown.",
        "",
        *([f"`{meta['command']}`", ""] if meta.get("command") else []),
        *_targets_md(doc.get("targets") or []),
        "Closed loop (wrk, HTTP/1.1 keep-alive, one connection per concurrency unit). "
        "CPU is milliseconds of CPU per request (= CPU seconds per 1,000 requests), read "
        "from /proc/<pid>/stat around each run. `x0`/`x1`: throughput relative to scenario "
        "0/1 at the same concurrency. `err`: non-expected statuses + socket errors, summed "
        "over repetitions. `noise`: the most CPU (in cores) that other processes on the host "
        "used during any repetition of the cell; above "
        f"{NOISY_CORES} the cell is marked `!`.",
        "",
        "| scenario | conc | req/s | x0 | x1 | p50 ms | p90 ms | p99 ms | p99 x0 | "
        "CPU envoy | CPU service | CPU redis | CPU exporter | err | noise |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["summary"]:
        cpu = r["cpu_ms_per_req"]
        out.append(
            f"| {r['scenario']} {names.get(r['scenario'], '')} | {r['concurrency']} | "
            f"{_f(r['rps'], ',.0f')} | {_f(r['rps_vs_0'], '.3f')} | {_f(r['rps_vs_1'], '.3f')} | "
            f"{_f(r['p50_ms'], '.2f')} | {_f(r['p90_ms'], '.2f')} | {_f(r['p99_ms'], '.2f')} | "
            f"{_f(r['p99_vs_0'], '.1f')} | {_f(cpu.get('envoy'), '.3f')} | "
            f"{_f(cpu.get('service'), '.3f')} | {_f(cpu.get('redis'), '.3f')} | "
            f"{_f(cpu.get('exporter'), '.3f')} | "
            f"{r['errors'] + r['unexpected']} | {_noise(r)} |"
        )
    out += _floors_md(doc.get("floors") or [], names)
    out += _micro_md(doc.get("micro"))
    if doc.get("audit"):
        out += [
            "",
            "Audit on / off (scenario 4 over scenario 2: the same allow, with and "
            "without its durable record; the exporter's CPU is on the same host). "
            f"Target >= {AUDIT_TARGET}.",
            "",
            "| conc | audit on req/s | audit off req/s | ratio of medians | "
            "per-repetition ratios | median of those |",
            "|---:|---:|---:|---:|---|---:|",
        ]
        for a in doc["audit"]:
            out.append(
                f"| {a['concurrency']} | {_f(a['on_rps'], ',.0f')} | {_f(a['off_rps'], ',.0f')} "
                f"| {_f(a['ratio'], '.3f')} | "
                f"{', '.join(format(x, '.3f') for x in a['paired'])} | "
                f"{_f(a['paired_median'], '.3f')} |"
            )
    if doc.get("fixed_rate"):
        fr = doc["fixed_rate"]
        out += [
            "",
            f"Fixed rate, open loop ({fr['config'].get('tool', 'h2load --rps')}; "
            f"{fr['config']['total_rps']:,} req/s, "
            f"{fr['config']['duration_s']} s after {fr['config']['warmup_s']} s warm-up; "
            "percentiles computed from the per-request log).",
            "",
            "`p99 x1`: the p99 over jwt_authn's (scenario 1) in the same run.",
            "",
            "| scenario | target req/s | achieved | p50 ms | p90 ms | p99 ms | p99.9 ms | "
            "max ms | p99 x0 | p99 x1 | CPU service | err | noise |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in fr["summary"]:
            out.append(
                f"| {r['scenario']} {names.get(r['scenario'], '')} | {r['target_rps']:,} | "
                f"{_f(r['achieved_rps'], ',.0f')} | {_f(r['p50_ms'], '.2f')} | "
                f"{_f(r['p90_ms'], '.2f')} | {_f(r['p99_ms'], '.2f')} | "
                f"{_f(r['p999_ms'], '.2f')} | {_f(r['max_ms'], '.2f')} | "
                f"{_f(r['p99_vs_0'], '.1f')} | {_f(r['p99_vs_1'], '.2f')} | "
                f"{_f(r['cpu_ms_per_req'].get('service'), '.3f')} | {r['unexpected']} | "
                f"{_noise(r)} |"
            )
    noisy = [
        r
        for r in doc["summary"] + list((doc.get("fixed_rate") or {}).get("summary", []))
        if r.get("foreign_cores_max", 0.0) > NOISY_CORES
    ]
    if noisy:
        out += [
            "",
            f"**Warning: {len(noisy)} cells ran while other processes used more than "
            f"{NOISY_CORES} cores of this host (`!` in `noise`): those figures understate "
            "what the stack can do. Re-run on a quiet host.**",
        ]
    skipped = doc.get("skipped") or []
    if skipped:
        out += [
            "",
            "Not run: "
            + "; ".join(f"{s['id']} {s['title']} ({s['reason']})" for s in skipped)
            + ".",
        ]
    mem = doc.get("service_rss_kib")
    if mem:
        out += ["", f"Service RSS: {mem['start']:,} KiB at start, {mem['end']:,} KiB at end."]
    out.append("")
    return "\n".join(out)


def _targets_md(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = [
        "Issue 18's targets, from this run (ratios of medians of interleaved repetitions; "
        f"closed-loop cells at c={TARGET_CONCURRENCY} where it ran):",
        "",
        "| target | cells | measured | limit | met |",
        "|---|---|---:|---:|---|",
    ]
    for t in rows:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        sign = "<=" if t["at_most"] else ">="
        out.append(
            f"| {t['target']} | {t['where'] or '-'} | {_f(t['measured'], '.2f')} | "
            f"{sign} {t['limit']:g} | {met} |"
        )
    return [*out, ""]


def _floors_md(rows: Sequence[Mapping[str, Any]], names: Mapping[str, str]) -> list[str]:
    if not rows:
        return []
    out = [
        "",
        "Against the floors and jwt_authn (same concurrency, same run). `CPU` is the "
        "service's CPU per check in microseconds; the floor of a gRPC cell is scenario 6 "
        "(no-op grpc.aio), of an HTTP cell scenario 7 (no-op asyncio HTTP), each behind an "
        "Envoy rendered from the same bootstrap and answering the service's own allow. "
        "`x floor`: ratio of the medians; `paired`: median of the per-repetition ratios; "
        "`above`: service CPU less the floor's (the project's code, roughly). `stack CPU`: "
        "Envoy + service + Redis per request, `x jwt` against jwt_authn's Envoy.",
        "",
        "| scenario | conc | CPU us | floor | floor CPU us | x floor | paired | above us | "
        "req/s x floor | p99 x floor | req/s x jwt | p99 x jwt | stack CPU us | x jwt |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['scenario']} {names.get(r['scenario'], '')} | {r['concurrency']} | "
            f"{_f(r['service_us'], '.0f')} | {r['floor'] or '-'} | {_f(r['floor_us'], '.0f')} | "
            f"{_f(r['cpu_x_floor'], '.2f')} | {_f(r['cpu_x_floor_paired'], '.2f')} | "
            f"{_f(r['above_floor_us'], '.0f')} | {_f(r['rps_x_floor'], '.2f')} | "
            f"{_f(r['p99_x_floor'], '.2f')} | {_f(r['rps_x_jwt'], '.2f')} | "
            f"{_f(r['p99_x_jwt'], '.2f')} | {_f(r['total_cpu_us'], '.0f')} | "
            f"{_f(r['total_cpu_x_jwt'], '.2f')} |"
        )
    return out


def _micro_md(micro: Mapping[str, Any] | None) -> list[str]:
    if not micro or not micro.get("modes"):
        return []
    m = micro["micro"]
    out = [
        "",
        f"bench.micro in the same run (`{m.get('command', 'python -m bench.micro')}`: the "
        "service's objects from the stack's own settings file, in process, real Valkey over "
        f"FastRedis; median of {m.get('reps')} x {m.get('n', 0):,} checks, "
        f"{micro['concurrency']} in flight) beside the service's CPU per check in situ at "
        "the same concurrency. In situ also pays the socket (and in gRPC mode grpcio), which "
        f"the floor measures. Target: within {MICRO_TOLERANCE:.0%} of in situ.",
        "",
        "| mode | bench.micro us | in situ us (scenario) | micro / in situ | floor us | "
        "in situ - floor us | micro / (in situ - floor) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, r in micro["modes"].items():
        out.append(
            f"| {mode} | {_f(r['micro_us'], '.0f')} | {_f(r['in_situ_us'], '.0f')} "
            f"({r['in_situ_scenario']}) | {_f(r['micro_x_in_situ'], '.2f')} | "
            f"{_f(r['floor_us'], '.0f')} | {_f(r['in_situ_above_floor_us'], '.0f')} | "
            f"{_f(r['micro_x_above_floor'], '.2f')} |"
        )
    return out


def plot(doc: Mapping[str, Any], path: Path) -> None:
    """Throughput and p99 against concurrency, one line per scenario (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {s["id"]: s["title"] for s in doc["scenarios"]}
    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    by_sid: dict[str, list[Mapping[str, Any]]] = {}
    for row in doc["summary"]:
        by_sid.setdefault(row["scenario"], []).append(row)
    for sid, rows in by_sid.items():
        xs = [r["concurrency"] for r in rows]
        label = f"{sid} {names.get(sid, '')}"
        ax_rps.plot(xs, [r["rps"] for r in rows], marker="o", label=label)
        ax_p99.plot(xs, [r["p99_ms"] for r in rows], marker="o", label=label)
    for ax, title, ylabel in (
        (ax_rps, "Throughput", "requests/s (median)"),
        (ax_p99, "p99 latency", "ms (median of runs)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(_concurrencies(doc["summary"]))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent connections (wrk)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_p99.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"stepup-authz bench ({doc['meta']['mode']}, {doc['meta']['started']})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _concurrencies(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    return sorted({int(r["concurrency"]) for r in rows})
