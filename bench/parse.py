"""Pure parsing and statistics for the benchmark: wrk's report, h2load's per-request log,
/proc/<pid>/stat, Envoy's admin /stats and Prometheus text. No I/O here, so every function is
unit-tested on captured text (tests/unit/test_bench_parse.py).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^([0-9.]+)(us|ms|s|m|h)$")


def wrk_duration_s(text: str) -> float:
    """``'123.45us'`` -> seconds. wrk prints latencies with us/ms/s (m/h when huge)."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


@dataclass(frozen=True)
class WrkResult:
    """One wrk run. Latencies in seconds; ``percentiles`` maps 50/75/90/99 to a latency."""

    requests: int
    duration_s: float
    rps: float
    percentiles: Mapping[int, float]
    non_2xx_3xx: int = 0
    socket_errors: Mapping[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + sum(self.socket_errors.values())


_REQS = re.compile(r"^\s*(\d+) requests in ([0-9.]+\w+),", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.M)
_PCT = re.compile(r"^\s+(\d+)%\s+([0-9.]+(?:us|ms|s|m|h))\s*$", re.M)
_NON2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.M)
_SOCKERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(text: str) -> WrkResult:
    """Parse wrk 4.x output produced with ``--latency``. Raises ValueError when incomplete."""
    reqs, rps = _REQS.search(text), _RPS.search(text)
    if reqs is None or rps is None:
        raise ValueError("wrk output has no request count or Requests/sec line:\n" + text)
    section = text.split("Latency Distribution", 1)
    if len(section) != 2:
        raise ValueError("wrk output has no Latency Distribution (run wrk with --latency)")
    pcts = {int(p): wrk_duration_s(v) for p, v in _PCT.findall(section[1])}
    non2xx = _NON2XX.search(text)
    sock = _SOCKERR.search(text)
    socket_errors = {}
    if sock is not None:
        socket_errors = dict(
            zip(
                ("connect", "read", "write", "timeout"),
                (int(g) for g in sock.groups()),
                strict=True,
            )
        )
    return WrkResult(
        requests=int(reqs.group(1)),
        duration_s=wrk_duration_s(reqs.group(2)),
        rps=float(rps.group(1)),
        percentiles=pcts,
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=socket_errors,
    )


@dataclass(frozen=True)
class H2Request:
    start_us: int
    status: int
    latency_us: int


def parse_h2load_log(text: str) -> list[H2Request]:
    """h2load ``--log-file``: tab-separated start (us since epoch), status, latency (us).

    Extra columns (the format allows more later) are ignored; a status of -1 (a request that
    never completed) is kept so it is counted as a failure.
    """
    rows: list[H2Request] = []
    for line in text.splitlines():
        cols = line.split("\t")
        if len(cols) < 3 or not cols[0].strip():
            continue
        rows.append(H2Request(int(cols[0]), int(cols[1]), int(cols[2])))
    return rows


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) — an observed value, never interpolated,
    the same convention as wrk's and HdrHistogram's reports."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def scenario_order(sid: str) -> tuple[int, str]:
    """Sort key of a scenario id: by its number ("2t" after "2", before "3"), then as text."""
    digits = "".join(c for c in sid if c.isdigit())
    return (int(digits) if digits else 99, sid)


def proc_cpu_ticks(stat_text: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/<pid>/stat.

    The command name (field 2) is in parentheses and may contain spaces or ')', so fields
    are counted from the last ')'. utime and stime are fields 14 and 15 (proc(5)).
    """
    rest = stat_text.rsplit(")", 1)[1].split()
    # rest[0] is field 3 (state): field n is rest[n - 3].
    return int(rest[14 - 3]) + int(rest[15 - 3])


def system_busy_ticks(proc_stat_text: str) -> int:
    """Busy clock ticks of all CPUs from /proc/stat's ``cpu`` line: everything but idle and
    iowait (user nice system idle iowait irq softirq steal ...; guest is inside user)."""
    for line in proc_stat_text.splitlines():
        if line.startswith("cpu "):
            f = [int(x) for x in line.split()[1:9]]
            return f[0] + f[1] + f[2] + f[5] + f[6] + f[7]
    raise ValueError("no aggregate cpu line in /proc/stat")


def parse_envoy_stats(text: str) -> dict[str, int]:
    """Envoy admin ``/stats`` text (``name: value`` lines); histograms are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.strip().lstrip("-").isdigit():
            out[name.strip()] = int(value)
    return out


_PROM = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([0-9.eE+-]+|NaN|[+-]Inf)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str, metric: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one metric from Prometheus text format: sorted label tuple -> value."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for line in text.splitlines():
        m = _PROM.match(line.strip())
        if m is None or m.group(1) != metric:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        out[labels] = float(m.group(3))
    return out


def decision_counts(
    before: Mapping[tuple[tuple[str, str], ...], float],
    after: Mapping[tuple[tuple[str, str], ...], float],
) -> dict[str, int]:
    """The service's decisions between two samples of ``stepup_authz_checks_total``, keyed
    ``outcome=..,reason=..`` and summed over the other labels (the level): one key per
    decision kind, never one label set overwriting another's count."""
    out: dict[str, int] = {}
    for labels, n in after.items():
        key = ",".join(f"{k}={v}" for k, v in labels if k in ("outcome", "reason"))
        out[key] = out.get(key, 0) + int(n - before.get(labels, 0))
    return {k: v for k, v in out.items() if v}


def delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    """Per-key difference, for keys in ``after`` (a counter that appeared counts from 0)."""
    return {k: v - before.get(k, 0) for k, v in after.items()}
