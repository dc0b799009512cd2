"""Where the service's CPU goes under load: the bench stack, wrk through Envoy, py-spy on the
service.

``python -m bench.profile [--seconds 15] [--conc 32] [--scenario 2] [--out FILE]`` starts the
same stack as ``bench.run`` (embedded Valkey, dev IdP, stepup-authz, Envoy), writes the
scenario-2 grant, drives ``GET /accounts/1`` with wrk and samples the service with
``py-spy record --format raw`` (collapsed stacks, ``--nonblocking`` so the sampler does not
stop the process it measures). It prints req/s, service CPU per request and two tables:
self time by function (the leaf frame of each sample) and inclusive time of the frames that
matter for the Check path. ``--raw FILE`` keeps the collapsed stacks (flamegraph.pl input).
Needs ``pip install py-spy``.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.parse import parse_prometheus, parse_wrk
from bench.stackctl import (
    ENVOY_DIR,
    cpu_seconds,
    http_text,
    password_token,
    write_grant,
)

REPO = Path(__file__).resolve().parent.parent
# Frames whose inclusive share is reported (substring of "function (file)").
INCLUSIVE = (
    "Check (authz/check/grpc_server.py",
    "attributes_from_check",
    "Authorizer.check",
    "check (authz",
    "_decide",
    "verify_access_token",
    "read_check",
    "_eval (authz",
    "note_allow",
    "ResponseBuilder.build",
    "build (authz/check/response.py",
    "record (authz/check/authorizer.py",
    "uuid4",
    "_audit",
    "fastredis",
    "redis/asyncio",
    "grpc/aio",
    "_cython",
    "handle (authz",
    "http_authz.py",
    "select",
    "epoll",
)
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if m is None:
        return frame
    file = m["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m['fn']} ({file})"


def summarise(raw: str, top: int = 25) -> str:
    """Self and inclusive tables from py-spy's collapsed stacks ("a;b;c count" lines)."""
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [_short(f) for f in stack.split(";")]
        self_t[frames[-1]] += count
        seen = set()
        for f in frames:
            for key in INCLUSIVE:
                if key in f and key not in seen:
                    seen.add(key)
                    incl[key] += count
    if not total:
        return "no samples\n"
    out = [f"samples: {total}", "", "| self % | function (file) |", "|---:|---|"]
    out += [f"| {c / total * 100:.1f} | `{f}` |" for f, c in self_t.most_common(top)]
    out += ["", "| inclusive % | frame |", "|---:|---|"]
    out += [f"| {incl[k] / total * 100:.1f} | `{k}` |" for k in INCLUSIVE if incl[k]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--conc", type=int, default=32)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument(
        "--scenario",
        default="2",
        choices=("2", "3", "4", "5"),
        help="2: allow via grant (gRPC), 3: step-up (gRPC), 4: allow audited before "
        "access (gRPC, GET /wires/1 at `high`), 5: allow, HTTP mode",
    )
    p.add_argument(
        "--process",
        default="service",
        choices=("service", "exporter"),
        help="which process py-spy samples (exporter: the audit exporter)",
    )
    p.add_argument("--workers", type=int, default=1, help="serve --workers N (profiles one)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--out", type=Path, help="write the summary here as well")
    p.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    p.add_argument("--no-spy", action="store_true", help="only measure, do not sample")
    p.add_argument("--native", action="store_true", help="py-spy --native: C frames too")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy")
    if spy is None and not args.no_spy:
        raise SystemExit("py-spy not found: pip install py-spy")
    from bench.stackctl import bench_stack  # the same stack as the benchmark

    with tempfile.TemporaryDirectory(prefix="stepup-profile-") as tmp:
        st = bench_stack(
            Path(tmp),
            REPO / "examples" / "policy.yaml",
            args.log_level,
            http_authz=args.scenario == "5",
            workers=args.workers,
        )
        with st:
            token = password_token(st.idp_url)
            if args.scenario != "3":
                write_grant(st, token, "high" if args.scenario == "4" else "elevated", 3600)
            path = "/wires/1" if args.scenario == "4" else "/accounts/1"
            url = st.envoy_url if args.scenario != "5" else st.http_envoy_url
            svc = st.service_proc
            assert svc is not None
            pid = svc.pid
            if args.workers > 1:
                from bench.stackctl import worker_pids

                pid = worker_pids(pid)[0]
            if args.process == "exporter":
                exp = st.exporter_proc
                if exp is None:
                    raise SystemExit("the stack runs no audit exporter")
                pid = exp.pid

            def wrk(seconds: int) -> list[str]:
                return [
                    "wrk",
                    "-t1",
                    "-c",
                    str(args.conc),
                    "-d",
                    f"{seconds}s",
                    "--latency",
                    "-H",
                    f"Authorization: Bearer {token}",
                    f"{url}{path}",
                ]

            subprocess.run(wrk(2), capture_output=True, check=True)  # warm-up
            raw_file = Path(tmp) / "spy.txt"
            spy_proc = None
            if not args.no_spy:
                assert spy is not None
                spy_proc = subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--format",
                        "raw",
                        "--nonblocking",
                        *(["--native"] if args.native else []),
                        "-r",
                        str(args.rate),
                        "-d",
                        str(args.seconds),
                        "-p",
                        str(pid),
                        "-o",
                        str(raw_file),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            c0, t0 = cpu_seconds(pid), time.monotonic()
            res = subprocess.run(wrk(args.seconds), capture_output=True, text=True, check=True)
            c1, t1 = cpu_seconds(pid), time.monotonic()
            if spy_proc is not None:
                spy_proc.wait(30)
            w = parse_wrk(res.stdout)
            # Why any non-2xx: the service's decisions by reason (not the expected "allowed").
            checks = parse_prometheus(
                http_text(f"{st.service_http_url}/metrics"), "stepup_authz_checks_total"
            )
            odd = {
                ",".join(v for k, v in labels if k == "reason"): int(n)
                for labels, n in checks.items()
                if dict(labels).get("reason") not in ("allowed", "acr-insufficient")
            }
            head = (
                f"scenario {args.scenario}, c={args.conc}, {args.seconds}s: "
                f"{w.rps:,.0f} req/s, p50 {w.percentiles[50] * 1000:.2f} ms, "
                f"p99 {w.percentiles[99] * 1000:.2f} ms, non-2xx {w.non_2xx_3xx}; "
                f"{args.process} CPU {(c1 - c0) / max(w.requests, 1) * 1e6:.0f} us/req "
                f"({(c1 - c0) / (t1 - t0):.2f} cores); other decisions: {odd or 'none'}\n"
            )
            text = head
            if spy_proc is not None and raw_file.exists():
                raw = raw_file.read_text()
                if args.raw:
                    args.raw.write_text(raw)
                text += "\n" + summarise(raw)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ENVOY_DIR", "summarise"]
