"""``python -m bench.run [--quick]`` — the benchmark against real Envoy, stepup-authz and Valkey
on loopback (issues 6 and 18). See bench/README.md for what is measured and how to read it.

Order of a run: start everything (the stack, the reference Envoys, and the two floors, which
answer with the service's own allow answer captured from it); check that one request per
scenario gets the expected status; warm up; then, for each repetition and each concurrency,
run every scenario in turn (rotating which goes first) so machine noise lands on all of them
alike; then the fixed-rate open-loop runs; then bench.micro against the same stack (its
figure beside the in-situ one); then write bench/results/latest.{json,md,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import ratios, report
from bench.inproc import grpc_check_request, http_check_head
from bench.parse import (
    decision_counts,
    delta,
    parse_h2load_log,
    parse_prometheus,
    parse_wrk,
    percentile,
)
from bench.scenarios import BY_ID, DEFAULT_IDS, SCENARIOS, Scenario
from bench.stackctl import (
    AUDIENCE,
    BENCH_DIR,
    ENVOY_DIR,
    BenchError,
    BenchStack,
    Envoy,
    Stack,
    bench_stack,
    capture_grpc_answer,
    capture_http_answer,
    children_cpu_seconds,
    cpu_seconds,
    envoy_counters,
    host_busy_seconds,
    http_get,
    http_text,
    mfa_token,
    password_token,
    rss_kib,
    stack_pids,
    start_envoy,
    start_floor,
    write_grant,
)

REPO = BENCH_DIR.parent
GRANT_TTL_S = 900  # the `elevated` level's max_age in examples/policy.yaml
GRANTED = "pwd-granted"  # the scenario credential whose session holds a grant


@dataclass(frozen=True)
class Target:
    """Where a scenario's load goes and which processes it is charged to."""

    url: str
    admin_url: str
    pids: Mapping[str, int]
    headers: Mapping[str, str]
    metrics_url: str | None = None  # the service's /metrics (scenarios through the service)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (< 1 min): 1 repetition of 2 s at c=32, a short fixed-rate run of "
        "scenarios 1 and 5, a short bench.micro",
    )
    p.add_argument("--reps", type=int, help="repetitions per cell (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 8; quick 2)")
    p.add_argument(
        "--concurrency",
        help="comma-separated wrk connection counts (default 1,8,32,128; quick 32)",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_IDS),
        help=f"comma-separated ids (default {','.join(DEFAULT_IDS)}; also: 2t). The floors "
        "(6, 7) need nothing else: the stack runs in any case (its answer is theirs)",
    )
    p.add_argument(
        "--with-audit",
        action="store_true",
        help="(scenario 4, audit-before-access, now runs by default)",
    )
    p.add_argument(
        "--with-http-authz",
        action="store_true",
        help="enable scenario 5 (HTTP ext_authz) — once the HTTP mode exists",
    )
    p.add_argument(
        "--wrk-threads",
        type=int,
        default=1,
        help="wrk threads (default 1: this host has few cores and wrk is cheap)",
    )
    p.add_argument(
        "--fixed-rate",
        type=int,
        default=1000,
        help="open-loop total req/s (0 disables; default 1000, issue 18's rate)",
    )
    p.add_argument(
        "--fixed-rate-scenarios",
        help="scenarios run at the fixed rate, those of them that run (default "
        "0,1,2,5,6,7; quick 1,5: the target compares 5's p99 with 1's)",
    )
    p.add_argument(
        "--fixed-rate-duration", type=float, help="seconds per fixed-rate run (default 8; quick 3)"
    )
    p.add_argument(
        "--fixed-rate-tool",
        choices=("openloop", "h2load"),
        default="openloop",
        help="open-loop generator: bench.openloop (evenly spaced, default) or "
        "h2load --rps (bursty)",
    )
    p.add_argument(
        "--fixed-rate-clients",
        type=int,
        default=8,
        help="h2load connections sharing the fixed rate (default 8)",
    )
    p.add_argument(
        "--service-workers", type=int, default=1, help="stepup-authz serve --workers N (default 1)"
    )
    p.add_argument(
        "--service-log-level",
        default="INFO",
        help="the service's log level (default INFO, as deployed: every denial is "
        "a log line, which scenario 3 pays for)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=BENCH_DIR / "results",
        help="output directory (default bench/results)",
    )
    p.add_argument("--workdir", type=Path, help="keep logs and configs here (default: a temp dir)")
    p.add_argument("--no-plot", action="store_true", help="skip latest.png (no matplotlib)")
    p.add_argument(
        "--no-micro",
        action="store_true",
        help="skip bench.micro against the stack after the load (its figure beside the "
        "in-situ one)",
    )
    p.add_argument(
        "--micro-n", type=int, help="bench.micro checks per repetition (default 10000; quick 2000)"
    )
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.duration = args.duration or (2.0 if args.quick else 8.0)
    args.fixed_rate_duration = args.fixed_rate_duration or (2.0 if args.quick else 8.0)
    args.concurrency = [
        int(c) for c in (args.concurrency or ("32" if args.quick else "1,8,32,128")).split(",") if c
    ]
    args.fixed_rate_scenarios = args.fixed_rate_scenarios or (
        "1,5" if args.quick else "0,1,2,5,6,7"
    )
    args.micro_n = args.micro_n or (2000 if args.quick else 10_000)
    return args


def _selected(args: argparse.Namespace) -> tuple[list[Scenario], list[dict[str, str]]]:
    ids = [i.strip() for i in args.scenarios.split(",") if i.strip()]
    if args.with_audit:
        ids.append("4")
    if args.with_http_authz:
        ids.append("5")
    chosen, skipped = [], []
    for sid in dict.fromkeys(ids):
        if sid not in BY_ID:
            raise SystemExit(f"unknown scenario {sid!r}; known: {', '.join(BY_ID)}")
        s = BY_ID[sid]
        if s.available:
            chosen.append(s)
        else:
            skipped.append({"id": s.id, "title": s.title, "reason": s.unavailable_reason})
    for s in SCENARIOS:
        if not s.available and s.id not in ids:
            skipped.append({"id": s.id, "title": s.title, "reason": s.unavailable_reason})
    return chosen, skipped


def _require_tools(need_h2load: bool) -> dict[str, str]:
    tools = {
        "wrk": shutil.which("wrk"),
        "envoy": shutil.which("envoy") or str(Path(sys.executable).parent / "envoy"),
    }
    if need_h2load:
        tools["h2load"] = shutil.which("h2load")
    missing = [k for k, v in tools.items() if not v or not Path(v).exists()]
    if missing:
        raise SystemExit(
            f"missing tools: {', '.join(missing)} "
            "(apt-get install -y wrk nghttp2-client; envoy comes with .[dev])"
        )
    return {k: str(v) for k, v in tools.items()}


# -- one measured run -------------------------------------------------------------------------
def _snapshot(t: Target) -> dict[str, Any]:
    snap: dict[str, Any] = {"envoy": envoy_counters(t.admin_url)}
    if t.metrics_url:
        snap["checks"] = parse_prometheus(http_text(t.metrics_url), "stepup_authz_checks_total")
    snap["cpu"] = {name: cpu_seconds(pid) for name, pid in t.pids.items()}  # last: tightest
    snap["host"], snap["tool"], snap["t"] = (
        host_busy_seconds(),
        children_cpu_seconds(),
        time.monotonic(),
    )
    return snap


def _after(t: Target) -> dict[str, Any]:
    snap: dict[str, Any] = {
        "t": time.monotonic(),
        "host": host_busy_seconds(),
        "tool": children_cpu_seconds(),
    }
    snap["cpu"] = {name: cpu_seconds(pid) for name, pid in t.pids.items()}
    snap["envoy"] = envoy_counters(t.admin_url)
    if t.metrics_url:
        snap["checks"] = parse_prometheus(http_text(t.metrics_url), "stepup_authz_checks_total")
    return snap


def _accounting(
    s: Scenario, t: Target, before: Mapping[str, Any], after: Mapping[str, Any], requests: int
) -> dict[str, Any]:
    """CPU per request and the status accounting from Envoy's (and the service's) counters."""
    cpu = {name: after["cpu"][name] - before["cpu"][name] for name in t.pids}
    env = delta(after["envoy"], before["envoy"])
    classes = {c: env.get(f"http.edge.downstream_rq_{c}", 0) for c in ("2xx", "3xx", "4xx", "5xx")}
    expected = f"{s.expect_status // 100}xx"
    unexpected = sum(n for c, n in classes.items() if c != expected)
    # Envoy counts per class only: an ext_authz error (timeout, broken call) is answered with
    # status_on_error (403), already a non-expected class where a 2xx is expected; where a
    # 4xx is expected (scenario 3) it hides in that class, so it is added there.
    authz_errors = env.get("http.edge.ext_authz.error", 0)
    if expected == "4xx":
        unexpected += authz_errors
    out: dict[str, Any] = {
        "cpu_s": cpu,
        "cpu_ms_per_req": {
            n: (c / requests * 1000 if requests else None)
            for n, c in cpu.items()
            if n in s.processes
        },
        "statuses": classes,
        "ext_authz": {k.rsplit(".", 1)[1]: v for k, v in env.items() if ".ext_authz." in k and v},
        "unexpected": unexpected,
        # Cores busy with anything but the measured processes and the load tool: another
        # workload on the host (a test suite, a build) makes a run unrepresentative.
        "foreign_cores": max(
            0.0,
            (after["host"] - before["host"] - sum(cpu.values()) - (after["tool"] - before["tool"]))
            / max(after["t"] - before["t"], 1e-9),
        ),
    }
    if "checks" in after:
        out["service_decisions"] = decision_counts(before["checks"], after["checks"])
    return out


def run_wrk(
    wrk: str, s: Scenario, t: Target, conc: int, duration: float, threads: int, rep: int
) -> dict[str, Any]:
    argv = [
        wrk,
        "-t",
        str(min(threads, conc)),
        "-c",
        str(conc),
        "-d",
        f"{max(1, round(duration))}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    for k, v in t.headers.items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(t.url + s.path)
    before = _snapshot(t)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    after = _after(t)
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    w = parse_wrk(proc.stdout)
    pct = w.percentiles
    return {
        "scenario": s.id,
        "concurrency": conc,
        "rep": rep,
        "requests": w.requests,
        "duration_s": w.duration_s,
        "rps": w.rps,
        "p50_ms": pct[50] * 1000,
        "p75_ms": pct[75] * 1000,
        "p90_ms": pct[90] * 1000,
        "p99_ms": pct[99] * 1000,
        "non_2xx_3xx": w.non_2xx_3xx,
        "socket_errors": dict(w.socket_errors),
        # a 401 is the expected answer in scenario 3: wrk's Non-2xx count is not an error there
        "errors": sum(w.socket_errors.values()) + (w.non_2xx_3xx if s.expect_status < 300 else 0),
        **_accounting(s, t, before, after, w.requests),
    }


def run_h2load(
    h2load: str,
    s: Scenario,
    t: Target,
    total_rps: int,
    clients: int,
    duration: float,
    workdir: Path,
    rep: int,
    tool: str = "openloop",
) -> dict[str, Any]:
    """Open loop at ``total_rps``. ``tool="openloop"`` (default): bench.openloop, evenly
    spaced HTTP/1.1 requests, latency from when each was due. ``tool="h2load"``: each of
    ``clients`` HTTP/2 connections starts ``total_rps/clients`` requests per second whether or
    not earlier ones finished (up to ``-m`` in flight per connection) -- in bursts (README)."""
    per_client = max(1, round(total_rps / clients))
    warmup = 1.0
    logf = workdir / f"{tool}-{s.id}-{rep}.tsv"
    logf.unlink(missing_ok=True)
    if tool == "openloop":
        clients, per_client = 1, total_rps
        argv = [
            sys.executable,
            "-m",
            "bench.openloop",
            "--rate",
            str(total_rps),
            "--duration",
            f"{duration}",
            "--warmup",
            f"{warmup}",
            "--log-file",
            str(logf),
        ]
    else:
        argv = [
            h2load,
            "-t",
            "1",
            "-c",
            str(clients),
            "-m",
            "64",
            "--rps",
            str(per_client),
            "-D",
            f"{max(1, round(duration))}",
            "--warm-up-time",
            f"{round(warmup)}",
            "--log-file",
            str(logf),
        ]
    for k, v in t.headers.items():
        argv += ["-H", f"{k.lower()}: {v}"]
    argv.append(t.url + s.path)
    before = _snapshot(t)
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + warmup + 60, check=False
    )
    after = _after(t)
    if proc.returncode != 0:
        raise BenchError(f"h2load failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    rows = parse_h2load_log(logf.read_text())
    if not rows:
        raise BenchError(f"h2load logged no requests:\n{proc.stdout}")
    t0 = min(r.start_us for r in rows)
    span_s = max((max(r.start_us for r in rows) - t0) / 1e6, 1e-9)
    lat = [r.latency_us / 1000 for r in rows]
    wrong = sum(1 for r in rows if r.status != s.expect_status)
    acc = _accounting(s, t, before, after, len(rows))
    return {
        "scenario": s.id,
        "rep": rep,
        "target_rps": per_client * clients,
        "requests": len(rows),
        "achieved_rps": len(rows) / span_s,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "p999_ms": percentile(lat, 99.9),
        "max_ms": max(lat),
        "wrong_status": wrong,
        **acc,
        # CPU covers the warm-up too; charge it over every request h2load sent (approximately
        # rate x (duration + warm-up)), not only the logged ones.
        "cpu_ms_per_req": {
            n: c / (per_client * clients * (duration + warmup)) * 1000
            for n, c in acc["cpu_s"].items()
            if n in s.processes
        },
        # Envoy's counters and the per-request log see the same failures (Envoy's also those
        # of the warm-up): the larger, never their sum.
        "unexpected": max(acc["unexpected"], wrong),
    }


# -- setup ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _environment(
    args: argparse.Namespace, scenarios: Sequence[Scenario], workdir: Path, tools: Mapping[str, str]
) -> Iterator[Running]:
    """Start the stack, the reference Envoys and the floors; yield what the measurement
    needs."""
    with contextlib.ExitStack() as stack_cm:
        log(f"starting Valkey, dev IdP, stepup-authz and Envoy in {workdir}")
        st = bench_stack(
            workdir / "stack",
            REPO / "examples" / "policy.yaml",
            args.service_log_level,
            # the HTTP floor answers what the service's HTTP listener answers
            http_authz=any(s.mode == "http" for s in scenarios),
            workers=args.service_workers,
        )
        stack_cm.enter_context(st)
        pids = stack_pids(st)
        tokens = {
            "pwd": password_token(st.idp_url),
            "pwd-granted": password_token(st.idp_url),
            "mfa": mfa_token(st.idp_url),
        }
        _regrant(st, tokens["pwd-granted"])
        needs = {s.target for s in scenarios}
        envoys: dict[str, Envoy] = {}
        if "ceiling" in needs:
            envoys["ceiling"] = start_envoy(
                "ceiling", ENVOY_DIR / "ceiling.yaml", workdir, tools["envoy"]
            )
            stack_cm.callback(envoys["ceiling"].stop)
        if "jwt" in needs:
            jwks = workdir / "jwks.json"
            jwks.write_text(http_text(f"{st.idp_url}/jwks"))
            envoys["jwt"] = start_envoy(
                "jwt_rbac",
                ENVOY_DIR / "jwt_rbac.yaml",
                workdir,
                tools["envoy"],
                issuer=st.idp_url,
                audience=AUDIENCE,
                jwks_file=str(jwks),
            )
            stack_cm.callback(envoys["jwt"].stop)
        floors = {}
        for s in scenarios:
            if s.role not in ("floor", "floor-await") or s.mode is None:
                continue
            answer = _service_answer(st, s, tokens)
            log(f"{s.target}: answers the service's own {len(answer)}-byte allow")
            floors[s.target] = start_floor(
                s.mode,
                answer,
                workdir,
                tools["envoy"],
                await_redis=st.redis_url if s.role == "floor-await" else None,
                spin_us=s.spin_us,
            )
            stack_cm.callback(floors[s.target].stop)
        targets: dict[str, Target] = {}
        for s in scenarios:
            headers = (
                {} if s.credential is None else {"Authorization": f"Bearer {tokens[s.credential]}"}
            )
            if s.target == "stack":
                targets[s.id] = Target(
                    st.envoy_url,
                    st.admin_url,
                    pids,
                    headers,
                    metrics_url=f"{st.service_http_url}/metrics",
                )
            elif s.target == "stack-http":  # the HTTP ext_authz Envoy in front of the service
                assert st.http_envoy is not None
                targets[s.id] = Target(
                    st.http_envoy.url,
                    st.http_envoy.admin_url,
                    {**pids, "envoy": st.http_envoy.pid},
                    headers,
                    metrics_url=f"{st.service_http_url}/metrics",
                )
            elif s.target in floors:
                f = floors[s.target]
                assert f.envoy is not None
                targets[s.id] = Target(
                    f.envoy.url,
                    f.envoy.admin_url,
                    {"envoy": f.envoy.pid, "service": f.pid}
                    | ({"redis": pids["redis"]} if "redis" in s.processes else {}),
                    headers,
                )
            else:
                e = envoys[s.target]
                targets[s.id] = Target(e.url, e.admin_url, {"envoy": e.pid}, headers)
        jwt_envoy = envoys.get("jwt")
        running = Running(
            targets,
            # A grant for the "pwd-granted" session: the Redis read in scenario 2 finds it.
            regrant=lambda: _regrant(st, tokens["pwd-granted"]),
            extra_sanity=lambda: _jwt_refuses_pwd(jwt_envoy, tokens["pwd"]),
            service_rss=lambda: rss_kib(pids["service"]),
            stack=st,
            redis_pid=pids["redis"],
        )
        yield running


def _service_answer(st: Stack, s: Scenario, tokens: Mapping[str, str]) -> bytes:
    """The service's own answer to scenario ``s``'s request, asked directly (no Envoy): the
    bytes the floor of that mode sends back for every check."""
    assert s.credential is not None
    token = tokens[s.credential]
    if s.mode == "grpc":
        answer = capture_grpc_answer(st.grpc_target, grpc_check_request(token, s.path))
        from envoy.service.auth.v3 import external_auth_pb2

        if external_auth_pb2.CheckResponse.FromString(answer).status.code != 0:
            raise BenchError("the service did not allow the floor's request over gRPC")
        return answer
    assert isinstance(st, BenchStack) and st.with_http_authz
    answer = capture_http_answer(st.check_port, http_check_head(token, s.path))
    if not answer.startswith(b"HTTP/1.1 200 "):
        raise BenchError(f"the service did not allow the floor's request: {answer[:300]!r}")
    return answer


def _regrant(st: Stack, token: str) -> None:
    """Fresh grants for scenario 2 (`elevated`) and 4 (`high`, max_age 300 s)."""
    for level in ("elevated", "high"):
        write_grant(st, token, level, GRANT_TTL_S)


@dataclass(frozen=True)
class Running:
    targets: Mapping[str, Target]
    regrant: Callable[[], None]
    extra_sanity: Callable[[], None]
    service_rss: Callable[[], int]
    stack: Stack
    redis_pid: int


def _jwt_refuses_pwd(envoy: Envoy | None, pwd: str) -> None:
    """Scenario 1 must really enforce: a password-only token is refused by RBAC."""
    if envoy is None:
        return
    status, _, _ = http_get(f"{envoy.url}/accounts/1", {"Authorization": f"Bearer {pwd}"})
    if status != 403:
        raise BenchError(f"jwt_authn+RBAC let an acr=pwd token through (status {status})")


def sanity(s: Scenario, t: Target) -> None:
    """One request must get the scenario's expected status before anything is measured,
    and through ext_authz that answer must be the authorization server's (a floor that
    Envoy could not reach would be a 403, never an allow; this also proves the allow
    came from the server rather than from a route without the filter)."""
    before = envoy_counters(t.admin_url) if s.mode is not None else None
    status, headers, body = http_get(t.url + s.path, dict(t.headers))
    if status != s.expect_status:
        raise BenchError(
            f"scenario {s.id} ({s.name}): expected {s.expect_status}, got {status} "
            f"{headers.get('x-stepup-reason', '')} {body[:200]!r}"
        )
    if before is not None:
        counters = delta(envoy_counters(t.admin_url), before)
        key = "http.edge.ext_authz." + ("ok" if s.expect_status < 300 else "denied")
        if counters.get(key, 0) < 1:
            raise BenchError(f"scenario {s.id}: Envoy did not count the answer as {key}")
    if s.id == "3":
        www = headers.get("www-authenticate", "")
        if "insufficient_user_authentication" not in www:
            raise BenchError(f"scenario 3 answered 401 without the step-up challenge: {www!r}")


def _run_micro(
    args: argparse.Namespace, env: Running, scenarios: Sequence[Scenario], workdir: Path
) -> dict[str, Any] | None:
    """bench.micro in a process of its own, on the stack's own settings file (its Valkey,
    IdP, keyring, policy and audit settings), while the stack is idle: the in-process
    figure of the same run, for the comparison in latest.md."""
    modes = {s.mode for s in scenarios if s.role == "service" and s.credential == GRANTED}
    if not modes:
        return None
    mode = "both" if len(modes) > 1 else modes.pop()
    out = workdir / "micro.json"
    argv = [
        sys.executable,
        "-m",
        "bench.micro",
        "--config",
        str(env.stack.workdir / "config.yaml"),
        "--redis-pid",
        str(env.redis_pid),
        "--mode",
        str(mode),
        "--n",
        str(args.micro_n),
        "--reps",
        str(args.reps),
        "--concurrency",
        "32",
        "--json",
        str(out),
    ]
    log(f"bench.micro ({mode}, {args.reps} x {args.micro_n:,} checks) on the stack's settings")
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
    if proc.returncode != 0:
        raise BenchError(f"bench.micro failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["command"] = "python -m bench.micro " + " ".join(argv[3:])
    return result


def _versions(tools: Mapping[str, str]) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (
            (out.stdout or out.stderr).strip().splitlines()[0]
            if (out.stdout or out.stderr)
            else "?"
        )

    envoy = first_line([tools["envoy"], "--version"])
    envoy = envoy.split("version: ", 1)[-1].split("/")[1] if "/" in envoy else envoy
    v = {
        "envoy": envoy,
        "python": platform.python_version(),
        "wrk": first_line([tools["wrk"], "--version"]).split(" [")[0],
    }
    if "h2load" in tools:
        v["h2load"] = first_line([tools["h2load"], "--version"])
    return v


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


# -- main -------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    scenarios, skipped = _selected(args)
    fixed_ids = [i for i in args.fixed_rate_scenarios.split(",") if i] if args.fixed_rate else []
    fixed = [s for s in scenarios if s.id in fixed_ids]
    tools = _require_tools(bool(fixed) and args.fixed_rate_tool == "h2load")
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    t_start = time.monotonic()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="stepup-bench-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    fixed_runs: list[dict[str, Any]] = []
    micro: dict[str, Any] | None = None
    try:
        with _environment(args, scenarios, workdir, tools) as env:
            targets = env.targets
            for s in scenarios:
                sanity(s, targets[s.id])
            env.extra_sanity()
            log("sanity: every scenario answers its expected status")
            rss_start = env.service_rss()
            for s in scenarios:  # warm-up: token cache, connection pools, JIT-less but caches
                run_wrk(
                    tools["wrk"],
                    s,
                    targets[s.id],
                    8,
                    1.0 if args.quick else 2.0,
                    args.wrk_threads,
                    -1,
                )
            total = args.reps * len(args.concurrency) * len(scenarios)
            n = 0
            for rep in range(args.reps):
                for ci, conc in enumerate(args.concurrency):
                    k = (rep + ci) % len(scenarios)  # rotate who goes first
                    for s in scenarios[k:] + scenarios[:k]:
                        if s.credential == GRANTED:
                            env.regrant()  # keep the grant fresh for long runs
                        n += 1
                        r = run_wrk(
                            tools["wrk"],
                            s,
                            targets[s.id],
                            conc,
                            args.duration,
                            args.wrk_threads,
                            rep,
                        )
                        runs.append(r)
                        log(
                            f"[{n}/{total}] s{s.id} c={conc} rep={rep}: {r['rps']:,.0f} req/s "
                            f"p99 {r['p99_ms']:.2f} ms err {r['errors'] + r['unexpected']} "
                            f"foreign {r['foreign_cores']:.2f} cores"
                        )
            for rep in range(args.reps if fixed else 0):
                for s in fixed:
                    if s.credential == GRANTED:
                        env.regrant()
                    r = run_h2load(
                        tools.get("h2load", ""),
                        s,
                        targets[s.id],
                        args.fixed_rate,
                        args.fixed_rate_clients,
                        args.fixed_rate_duration,
                        workdir,
                        rep,
                        args.fixed_rate_tool,
                    )
                    fixed_runs.append(r)
                    log(
                        f"fixed {args.fixed_rate}/s s{s.id} rep={rep}: "
                        f"{r['achieved_rps']:,.0f} req/s p99 {r['p99_ms']:.2f} ms "
                        f"err {r['unexpected']} foreign {r['foreign_cores']:.2f} cores"
                    )
            rss_end = env.service_rss()
            for s in scenarios:  # still healthy after the load?
                sanity(s, targets[s.id])
            micro = None if args.no_micro else _run_micro(args, env, scenarios, workdir)
    finally:
        if tmp is not None:
            tmp.cleanup()
    doc: dict[str, Any] = {
        "meta": {
            "started": started,
            "wall_s": round(time.monotonic() - t_start, 1),
            "mode": "quick" if args.quick else "full",
            "reps": args.reps,
            "duration_s": args.duration,
            "concurrency": args.concurrency,
            "wrk_threads": args.wrk_threads,
            "service_log_level": args.service_log_level,
            "service_workers": args.service_workers,
            "host": {
                "cpus": os.cpu_count(),
                "cpu_model": _cpu_model(),
                "kernel": platform.release(),
            },
            "versions": _versions(tools),
            "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
        },
        "scenarios": [asdict(s) for s in scenarios],
        "skipped": skipped,
        "summary": report.summarize(runs),
        "floors": ratios.floor_ratios(runs, [asdict(s) for s in scenarios]),
        "audit": report.audit_ratios(runs),
        "runs": runs,
        "service_rss_kib": {"start": rss_start, "end": rss_end},
    }
    if fixed_runs:
        doc["fixed_rate"] = {
            "config": {
                "total_rps": args.fixed_rate,
                "clients": args.fixed_rate_clients,
                "rps_per_client": max(1, round(args.fixed_rate / args.fixed_rate_clients)),
                "duration_s": args.fixed_rate_duration,
                "warmup_s": 1.0,
                "tool": (
                    "h2load --rps (HTTP/2, h2c prior knowledge)"
                    if args.fixed_rate_tool == "h2load"
                    else "bench.openloop (HTTP/1.1 keep-alive, evenly spaced, latency "
                    "from each request's due time)"
                ),
            },
            "summary": report.summarize_fixed(fixed_runs),
            "vs_jwt": ratios.fixed_vs_reference(fixed_runs, [asdict(s) for s in fixed]),
            "runs": fixed_runs,
        }
    if micro is not None:
        doc["micro"] = ratios.micro_comparison(micro, doc["summary"])
    doc["targets"] = ratios.targets(doc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = report.markdown(doc)
    (args.out / "latest.md").write_text(md)
    if not args.no_plot:
        report.plot(doc, args.out / "latest.png")
    print(md)
    log(
        f"wrote {args.out}/latest.json, latest.md"
        + ("" if args.no_plot else ", latest.png")
        + f" in {doc['meta']['wall_s']:.0f} s"
    )
    bad = sum(r["errors"] + r["unexpected"] for r in runs) + sum(
        r["unexpected"] for r in fixed_runs
    )
    if bad:
        log(f"WARNING: {bad} responses were not the expected status (see latest.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
