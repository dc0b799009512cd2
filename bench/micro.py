"""Python CPU per Check of the service's own path, in process (bench/inproc.py): the
composition root's objects (token verifier, RedisSessionStore over FastRedis, Authorizer,
response builders) with real Redis, fed the bytes Envoy sends, minus only the socket.

``python -m bench.micro [--mode http|grpc|both] [--n 20000] [--concurrency 32]``
``python -m bench.micro --config STACK/config.yaml``: the settings file of a running bench
stack (its Valkey, IdP, keyring and audit settings, the same as the service in situ);
``bench.run`` does this after its load runs and prints both figures side by side.

Without ``--config`` it starts an embedded Valkey (or uses ``--redis-url``) and the dev IdP
in this process and writes a settings file as the bench stack does. Each repetition is a
closed loop of ``--n`` checks with ``--concurrency`` in flight (as wrk's connections keep
Envoy's), the background ``note_allow`` writes waited for inside the measurement; the median
over ``--reps`` is reported. The HTTP mode's figure is comparable with the service's CPU per
check through Envoy (scenario 5) less the HTTP floor (scenario 7): what is not here is the
socket, which the floor measures. The gRPC mode excludes grpcio (scenario 6 measures it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import jwt
import uvloop

from bench import inproc

REPO = Path(__file__).resolve().parent.parent


async def _measure(args: argparse.Namespace, config: Path, redis_pid: int | None) -> dict[str, Any]:
    redis: dict[str, Any] = {"deadline_ms": args.deadline_ms}
    if args.slow_client:
        redis["fast_client"] = False
    settings = inproc.in_process_settings(config, redis=redis)
    service = await inproc.start(settings)
    try:
        authorizer = service.authorizer
        token = await asyncio.to_thread(inproc.password_token, settings)
        claims = jwt.decode(token, options={"verify_signature": False})
        level = "high" if args.audited else "elevated"
        await inproc.write_grant(authorizer.store, claims, level, 3600)
        path = "/wires/1" if args.audited else inproc.PATH
        redis_cpu = _redis_cpu(redis_pid)
        out: dict[str, Any] = {
            "n": args.n,
            "concurrency": args.concurrency,
            "reps": args.reps,
            "client": "redis-py" if args.slow_client else "FastRedis",
            "path": path,
        }
        modes = ("http", "grpc") if args.mode == "both" else (args.mode,)
        paths: dict[str, Any] = {
            "http": (inproc.HttpPath(authorizer, settings), inproc.http_check_head(token, path)),
            "grpc": (
                inproc.GrpcPath(authorizer, settings),
                inproc.grpc_check_request(token, path),
            ),
        }
        for mode in modes:
            check, raw = paths[mode]
            if await check.once(raw) != 200:
                raise SystemExit(f"bench.micro: the {mode} allow path did not allow")

        async def warm(check: Any, raw: bytes) -> None:
            for _ in range(300):
                await check.once(raw)
            await authorizer.drain()

        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for m in modes:
            await warm(*paths[m])
        for _ in range(args.reps):
            for m in modes:  # interleaved, like the harness's scenarios
                check, raw = paths[m]

                async def one(_: int, check: Any = check, raw: bytes = raw) -> int:
                    return int(await check.once(raw))

                r = await inproc.closed_loop(
                    one, args.n, args.concurrency, drain=authorizer.drain, redis_cpu=redis_cpu
                )
                runs[m].append(r.as_dict())
        for m in modes:
            rs = runs[m]
            out[m] = {
                "cpu_us_per_check": statistics.median(r["cpu_us_per_check"] for r in rs),
                "redis_us_per_check": _median_opt(r["redis_us_per_check"] for r in rs),
                "not_allowed": sum(r["not_allowed"] for r in rs),
                "runs": rs,
            }
        return out
    finally:
        await service.stop()


def _median_opt(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _redis_cpu(pid: int | None) -> Any:
    if pid is None:
        return None
    from bench.stackctl import cpu_seconds

    return lambda: cpu_seconds(pid)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.config is not None:
        return await _measure(args, args.config, args.redis_pid)
    with tempfile.TemporaryDirectory(prefix="stepup-micro-") as tmp:
        async with inproc.local_environment(Path(tmp), redis_url=args.redis_url) as env:
            config = env.write_settings(REPO / "examples" / "policy.yaml")
            return await _measure(args, config, env.redis_pid)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.micro",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", choices=("http", "grpc", "both"), default="both")
    p.add_argument("--n", type=int, default=20_000, help="checks per repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--config", type=Path, help="a bench stack's settings file (default: own)")
    p.add_argument("--redis-pid", type=int, help="with --config: Valkey's pid, for its CPU")
    p.add_argument("--redis-url", help="without --config: this Redis (default: embedded)")
    # A generous deadline: a profiler's overhead must not turn reads into failures.
    p.add_argument("--deadline-ms", type=int, default=2000)
    p.add_argument("--slow-client", action="store_true", help="scripts over redis-py")
    p.add_argument(
        "--audited",
        action="store_true",
        help="GET /wires/1 at `high`, allowed only after its durable audit record",
    )
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--profile", action="store_true", help="pyinstrument the measured loop")
    args = p.parse_args(argv)
    if args.profile:
        from pyinstrument import Profiler

        prof = Profiler(interval=0.0002, async_mode="disabled")
        prof.start()
        res = uvloop.run(run(args))
        prof.stop()
        print(prof.output_text(unicode=False, color=False, show_all=False))
    else:
        res = uvloop.run(run(args))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    for mode in ("http", "grpc"):
        if mode in res:
            r = res[mode]
            redis = r["redis_us_per_check"]
            print(
                f"{mode}: {r['cpu_us_per_check']:.1f} us CPU per check (median of "
                f"{args.reps} x {args.n:,}, concurrency {args.concurrency}, {res['client']})"
                + ("" if redis is None else f"; Redis {redis:.1f} us")
                + f"; not allowed: {r['not_allowed']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
