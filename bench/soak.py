"""Memory under constant load: is the service's RSS flat over minutes of Checks?

``python -m bench.soak [--seconds 300] [--conc 16] [--out FILE]`` starts the bench stack with
the HTTP ext_authz listener, writes the scenario-2 grant, and drives the allow path through
both Envoys at once (wrk, closed loop: gRPC mode and HTTP mode, ``--conc`` connections
each) for ``--seconds``, sampling the service's RSS (VmRSS, with its workers) every 5 s. It
prints the samples and a verdict: growth from the first sample after warm-up (30 s) to the
end, and the largest sample. The bounded structures on the Check path (verified-token
cache, the note-allow memory, the memoised path / host / peer parsers, background writes
in flight) all have fixed caps; the soak checks that nothing else grows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.parse import parse_wrk
from bench.stackctl import bench_stack, password_token, rss_kib, write_grant

REPO = Path(__file__).resolve().parent.parent
WARMUP_S = 30
SAMPLE_S = 5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=int, default=300)
    p.add_argument("--conc", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the samples and verdict here (JSON)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stepup-soak-") as tmp:
        st = bench_stack(
            Path(tmp),
            REPO / "examples" / "policy.yaml",
            "INFO",
            http_authz=True,
            workers=args.workers,
        )
        with st:
            token = password_token(st.idp_url)
            write_grant(st, token, "elevated", 3600)
            svc = st.service_proc
            assert svc is not None
            total = args.seconds + WARMUP_S
            loads = [
                subprocess.Popen(
                    [
                        "wrk",
                        "-t1",
                        "-c",
                        str(args.conc),
                        "-d",
                        f"{total}s",
                        "--latency",
                        "-H",
                        f"Authorization: Bearer {token}",
                        f"{url}/accounts/1",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for url in (st.envoy_url, st.http_envoy_url)
            ]
            t0 = time.monotonic()
            samples: list[tuple[float, int]] = []
            while any(w.poll() is None for w in loads):
                samples.append((round(time.monotonic() - t0, 1), rss_kib(svc.pid)))
                time.sleep(SAMPLE_S)
            results = [parse_wrk(w.communicate()[0]) for w in loads]
    steady = [(t, r) for t, r in samples if t >= WARMUP_S] or samples
    doc = {
        "seconds": args.seconds,
        "warmup_s": WARMUP_S,
        "conc_per_mode": args.conc,
        "checks": {"grpc": results[0].requests, "http": results[1].requests},
        "non_2xx": {"grpc": results[0].non_2xx_3xx, "http": results[1].non_2xx_3xx},
        "rss_kib": {
            "first": samples[0][1],
            "after_warmup": steady[0][1],
            "end": steady[-1][1],
            "max": max(r for _, r in steady),
            "growth_after_warmup": steady[-1][1] - steady[0][1],
        },
        "samples": samples,
    }
    r = doc["rss_kib"]
    print(json.dumps({k: v for k, v in doc.items() if k != "samples"}, indent=1))
    print(
        f"RSS after warm-up {r['after_warmup']:,} KiB -> end {r['end']:,} KiB "  # type: ignore[index]
        f"(max {r['max']:,}); {sum(doc['checks'].values()):,} checks"
    )  # type: ignore[union-attr, index]
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
