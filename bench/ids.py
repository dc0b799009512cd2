"""Cost of one identifier: the project's ULID (authz.core.ids) against python-ulid.

    python -m bench.ids [--n 200000]

Prints microseconds per id, the median of five timed runs of each. python-ulid is
measured when installed (`pip install python-ulid`); the project does not depend on it.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

from authz.core.ids import new_id


def _per_call_us(fn: object, n: int) -> float:
    runs = [timeit.timeit(fn, number=n) / n * 1e6 for _ in range(5)]  # type: ignore[arg-type]
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    n = ap.parse_args().n
    ours = _per_call_us(lambda: new_id(time.time_ns() // 1_000_000), n)
    print(f"authz.core.ids.new_id   {ours:6.2f} us")
    try:
        import ulid  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        print("python-ulid            (not installed)")
        return
    print(f"str(ulid.ULID())        {_per_call_us(lambda: str(ulid.ULID()), n):6.2f} us")


if __name__ == "__main__":
    main()
