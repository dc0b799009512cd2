"""Run every atheris harness in this folder for a bounded time (``make fuzz``).

    python tests/fuzz/run.py [--seconds 60] [--out var/fuzz] [harness ...]

Each harness keeps its corpus in ``OUT/<name>/corpus`` (kept between runs, so coverage
accumulates) and writes any crashing input to ``OUT/<name>/crash-*``; reproduce one with
``python tests/fuzz/<name>.py OUT/<name>/crash-...``. Exits non-zero if any harness found a
crash (an exception other than the expected error types, or a broken invariant).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESSES = sorted(p.stem for p in HERE.glob("fuzz_*.py"))


def run(name: str, seconds: int, out: Path) -> dict[str, str]:
    work = out / name
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        str(HERE / f"{name}.py"),
        str(corpus),
        f"-max_total_time={seconds}",
        "-print_final_stats=1",
        "-rss_limit_mb=2048",
        "-timeout=10",
        f"-artifact_prefix={work}/",
        "-max_len=8192",
    ]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=False)
    log = proc.stdout + proc.stderr
    (work / "last-run.log").write_text(log)
    execs = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
    crashes = sorted(p.name for p in work.glob("crash-*"))
    return {
        "harness": name,
        "exit": str(proc.returncode),
        "seconds": f"{time.monotonic() - started:.0f}",
        "execs": execs.group(1) if execs else "?",
        "coverage (cov/ft/corpus)": "/".join(cov[-1]) if cov else "?",
        "crashes": ", ".join(crashes) or "none",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("var/fuzz"))
    parser.add_argument("harness", nargs="*", default=HARNESSES)
    args = parser.parse_args()
    rows = [run(name, args.seconds, args.out) for name in args.harness]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(row[k] for k in keys) + " |")
    failed = [r for r in rows if r["exit"] != "0" or r["crashes"] != "none"]
    for r in failed:
        print(
            f"FINDING: {r['harness']}: see {args.out / r['harness']}/last-run.log", file=sys.stderr
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
