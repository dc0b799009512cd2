"""Issue 18's view of a run (pure functions over bench.run's records): every service cell
as a ratio to the floor of its mode and to jwt_authn, the fixed-rate p99 against jwt_authn's,
bench.micro beside the in-situ figure, and the targets with what this run measured."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from bench.parse import median, ratio, scenario_order

AUDIT_TARGET = 0.85  # issue 3: throughput with audit before access / without, same run
# Issue 18's targets, read at the concurrency its figures were measured at (wrk c=32).
TARGET_CONCURRENCY = 32
ALLOW_GRANT = {"grpc": "2", "http": "5"}  # the allow-via-grant cell of each mode
FLOOR = {"grpc": "6", "http": "7"}
JWT = "1"
HTTP_CPU_US_MAX = 40.0
HTTP_FLOOR_X_MAX = 3.3
GRPC_FLOOR_X_MAX = 1.4
FIXED_P99_X_JWT_MAX = 2.0
MICRO_TOLERANCE = 0.25  # bench.micro within 25 % of the in-situ service CPU per check


def _us(ms: float | None) -> float | None:
    return None if ms is None else ms * 1000


def _total_cpu(run: Mapping[str, Any]) -> float | None:
    cpu = [v for v in run["cpu_ms_per_req"].values() if v is not None]
    return sum(cpu) if cpu else None


def floor_ratios(
    runs: Iterable[Mapping[str, Any]], scenarios: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Every service cell against the floor of its mode and against jwt_authn, at the same
    concurrency: service CPU per check (us) and its ratio to the floor's (of the medians,
    and the median of the per-repetition ratios: the two cells of one repetition ran back
    to back), what the service spends above the floor, req/s and p99 ratios, and the whole
    stack's CPU per request (Envoy + service + Redis) against jwt_authn's Envoy."""
    info = {s["id"]: s for s in scenarios}
    floor_of = {s["mode"]: s["id"] for s in scenarios if s.get("role") == "floor"}
    jwt = next((s["id"] for s in scenarios if s.get("role") == "reference"), None)
    by: dict[tuple[str, int], dict[int, Mapping[str, Any]]] = {}
    for r in runs:
        if r.get("rep", 0) >= 0:
            by.setdefault((r["scenario"], r["concurrency"]), {})[r.get("rep", 0)] = r
    rows: list[dict[str, Any]] = []
    for (sid, conc), reps in sorted(
        by.items(), key=lambda kv: (scenario_order(kv[0][0]), kv[0][1])
    ):
        s = info.get(sid, {})
        # the awaiting gRPC floor (6r) too: its CPU over the no-op floor's is grpc.aio's
        # price for a handler that suspends once on Redis
        if s.get("role") not in ("service", "floor-await"):
            continue
        fid = floor_of.get(s.get("mode"))
        floor = by.get((fid, conc), {}) if fid else {}
        ref = by.get((jwt, conc), {}) if jwt else {}

        def med(
            cell: Mapping[int, Mapping[str, Any]], get: Callable[[Mapping[str, Any]], Any]
        ) -> float | None:
            return median(get(r) for r in cell.values())

        def svc(r: Mapping[str, Any]) -> float | None:
            v = r["cpu_ms_per_req"].get("service")
            return None if v is None else float(v)

        paired = [
            x
            for rep, r in sorted(reps.items())
            if rep in floor and (x := ratio(svc(r), svc(floor[rep]))) is not None
        ]
        service_us, floor_us = _us(med(reps, svc)), _us(med(floor, svc))
        rps, p99 = med(reps, lambda r: r["rps"]), med(reps, lambda r: r["p99_ms"])
        total = med(reps, _total_cpu)
        rows.append(
            {
                "scenario": sid,
                "concurrency": conc,
                "mode": s.get("mode"),
                "floor": fid if floor else None,
                "service_us": service_us,
                "floor_us": floor_us,
                "above_floor_us": None
                if service_us is None or floor_us is None
                else service_us - floor_us,
                "cpu_x_floor": ratio(service_us, floor_us),
                "cpu_x_floor_paired": median(paired) if paired else None,
                "rps": rps,
                "rps_x_floor": ratio(rps, med(floor, lambda r: r["rps"])),
                "p99_ms": p99,
                "p99_x_floor": ratio(p99, med(floor, lambda r: r["p99_ms"])),
                "rps_x_jwt": ratio(rps, med(ref, lambda r: r["rps"])),
                "p99_x_jwt": ratio(p99, med(ref, lambda r: r["p99_ms"])),
                "total_cpu_us": _us(total),
                "total_cpu_x_jwt": ratio(total, med(ref, _total_cpu)),
            }
        )
    return rows


def fixed_vs_reference(
    runs: Iterable[Mapping[str, Any]], scenarios: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """At the fixed rate: each ext_authz scenario's p99 against jwt_authn's in the same run
    (ratio of the medians, and the median of the per-repetition ratios)."""
    info = {s["id"]: s for s in scenarios}
    by: dict[str, dict[int, float]] = {}
    for r in runs:
        by.setdefault(r["scenario"], {})[r.get("rep", 0)] = r["p99_ms"]
    ref = by.get(JWT, {})
    rows = []
    for sid in sorted(by, key=scenario_order):
        if info.get(sid, {}).get("mode") is None:
            continue
        mine = by[sid]
        paired = [x for rep, v in sorted(mine.items()) if (x := ratio(v, ref.get(rep)))]
        rows.append(
            {
                "scenario": sid,
                "p99_ms": median(mine.values()),
                "jwt_p99_ms": median(ref.values()) if ref else None,
                "p99_x_jwt": ratio(median(mine.values()), median(ref.values()) if ref else None),
                "p99_x_jwt_paired": median(paired) if paired else None,
            }
        )
    return rows


def _cell(
    rows: Iterable[Mapping[str, Any]], sid: str, conc: int | None = None
) -> Mapping[str, Any] | None:
    """The summary row of ``sid`` at ``conc`` (default: TARGET_CONCURRENCY, else the
    highest concurrency that ran)."""
    mine = [r for r in rows if r["scenario"] == sid]
    if not mine:
        return None
    want = TARGET_CONCURRENCY if conc is None else conc
    exact = [r for r in mine if r["concurrency"] == want]
    if exact or conc is not None:
        return exact[0] if exact else None
    return max(mine, key=lambda r: r["concurrency"])


def micro_comparison(
    micro: Mapping[str, Any], summary: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """bench.micro's CPU per check beside the service's in situ (the allow-via-grant cell of
    the same mode at micro's concurrency, same run): their ratio, and the in-situ figure
    less the floor's (what the socket and, in gRPC mode, grpcio cost)."""
    conc = int(micro.get("concurrency", TARGET_CONCURRENCY))
    out: dict[str, Any] = {"micro": dict(micro), "concurrency": conc, "modes": {}}
    for mode in ("http", "grpc"):
        m = micro.get(mode)
        if not isinstance(m, Mapping):
            continue
        cell = _cell(summary, ALLOW_GRANT[mode], conc)
        floor = _cell(summary, FLOOR[mode], conc)
        situ = _us(cell["cpu_ms_per_req"].get("service")) if cell else None
        floor_us = _us(floor["cpu_ms_per_req"].get("service")) if floor else None
        above = None if situ is None or floor_us is None else situ - floor_us
        x = ratio(m["cpu_us_per_check"], situ)
        out["modes"][mode] = {
            "micro_us": m["cpu_us_per_check"],
            "in_situ_us": situ,
            "in_situ_scenario": ALLOW_GRANT[mode],
            "micro_x_in_situ": x,
            "within_tolerance": None if x is None else abs(x - 1) <= MICRO_TOLERANCE,
            "floor_us": floor_us,
            "in_situ_above_floor_us": above,
            "micro_x_above_floor": ratio(m["cpu_us_per_check"], above),
        }
    return out


def _target(
    name: str, measured: float | None, limit: float, *, at_most: bool = True, where: str = ""
) -> dict[str, Any]:
    met = None if measured is None else (measured <= limit if at_most else measured >= limit)
    return {
        "target": name,
        "measured": measured,
        "limit": limit,
        "at_most": at_most,
        "where": where,
        "met": met,
    }


def targets(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 18's targets, each with the figure this run measured (None: not measured)."""
    summary = doc.get("summary") or []
    floors = doc.get("floors") or []
    out = []
    http = _cell(summary, ALLOW_GRANT["http"])
    conc = http["concurrency"] if http else TARGET_CONCURRENCY
    where = f"scenario {ALLOW_GRANT['http']}, c={conc}"
    out.append(
        _target(
            "HTTP mode, allow via grant: service CPU per check (us)",
            _us(http["cpu_ms_per_req"].get("service")) if http else None,
            HTTP_CPU_US_MAX,
            where=where,
        )
    )

    def x_floor(mode: str) -> tuple[float | None, str]:
        cell = _cell(summary, ALLOW_GRANT[mode])
        if cell is None:
            return None, ""
        row = next(
            (
                f
                for f in floors
                if f["scenario"] == ALLOW_GRANT[mode] and f["concurrency"] == cell["concurrency"]
            ),
            None,
        )
        where = f"scenario {ALLOW_GRANT[mode]} / {FLOOR[mode]}, c={cell['concurrency']}"
        return (row["cpu_x_floor"] if row else None), where

    value, where = x_floor("http")
    out.append(
        _target("HTTP mode: service CPU x the HTTP floor", value, HTTP_FLOOR_X_MAX, where=where)
    )
    value, where = x_floor("grpc")
    out.append(
        _target("gRPC mode: service CPU x the grpc.aio floor", value, GRPC_FLOOR_X_MAX, where=where)
    )
    fixed = doc.get("fixed_rate") or {}
    row = next((r for r in fixed.get("vs_jwt") or [] if r["scenario"] == ALLOW_GRANT["http"]), None)
    rate = (fixed.get("config") or {}).get("total_rps")
    # Per repetition: at a fixed rate one noisy second moves a p99 by 10x, and the two runs
    # of a repetition ran back to back (the ratio of the medians can pair a quiet run of one
    # with a noisy run of the other; it is in latest.json as p99_x_jwt).
    paired = row.get("p99_x_jwt_paired") if row else None
    out.append(
        _target(
            "HTTP mode: fixed-rate p99 x jwt_authn's p99 (median of per-repetition ratios)",
            paired if paired is not None else (row["p99_x_jwt"] if row else None),
            FIXED_P99_X_JWT_MAX,
            where=f"{rate:,}/s, scenario {ALLOW_GRANT['http']} / {JWT}" if rate else "",
        )
    )
    audit = [a for a in doc.get("audit") or [] if a["concurrency"] == TARGET_CONCURRENCY]
    out.append(
        _target(
            "audit before access on/off (req/s)",
            audit[0]["ratio"] if audit else None,
            AUDIT_TARGET,
            at_most=False,
            where=f"scenario 4 / 2, c={TARGET_CONCURRENCY}",
        )
    )
    micro = (doc.get("micro") or {}).get("modes", {}).get("http")
    out.append(
        _target(
            "bench.micro (HTTP) / in-situ service CPU: |ratio - 1|",
            None
            if micro is None or micro["micro_x_in_situ"] is None
            else abs(micro["micro_x_in_situ"] - 1),
            MICRO_TOLERANCE,
            where=f"scenario {ALLOW_GRANT['http']}, same run",
        )
    )
    return out
