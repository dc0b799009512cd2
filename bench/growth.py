"""How a Check's cost grows: CPU per check (in process, the service's own HTTP-mode path, see
bench/inproc.py) against policy size, rule count, distinct active users and token-cache
misses. Writes bench/results/growth.{json,md}.

``python -m bench.growth [--n 5000] [--reps 3] [--users 1000,100000] [--quick]
[--dimension policy|rules|users|tokens ...]``

One embedded Valkey (or ``--redis-url``) and the dev IdP run for the whole benchmark; each
case is a service of its own (``authz.app.start_service`` from a settings file written as the
bench stack writes its own, with the case's policy and token-cache size), all in this process
and all on that Valkey. Cases, each against the baseline of its dimension:

* **policy size**: examples/policy.yaml (6 routes) against 1,000 routes (a third prefix,
  a third exact, a third regex; every 10th with a host, every 5th limited to POST/PUT) whose
  one matching route (``/accounts/`` GET) is first, then last;
* **rules**: the example routes with 0 rules against 100 (ip_in, ip_not_in, country_in,
  device, signals_any and level_at_least conditions; none fires for the request);
* **distinct users**: 1 against 1,000 and 100,000 users, each with its own token, session
  and grant (written through the store's API), checked in rotation; the token cache sized
  to hold them all, so this is the state (Redis, ``note_allow``) alone. One more case: 100k
  users with the default token cache (10,000 entries), where every check is also a miss.
  Above 5,000 users every check is its user's first within the lesson refresh interval
  (``first_in_interval``: the case's clock moves ``CLOCK_STEP_S`` ahead before each pass, and
  a pass never repeats a user), so each allow's lesson is written: the worst case. The
  returning case is the other end: 100k users in the keyspace, and the measured pass checks
  again the ``RETURNING_WINDOW`` users its warm pass has just checked, as active users
  browsing within the minute are;
* **token cache**: the same user's one token (a hit) against a token never seen before on
  every check (same user and session: RS256 verification and claims, nothing else differs).

The tokens are signed by the IdP's own key with the claims of a token its token endpoint
issued (subject, ``sid`` and ``jti`` changed): 100k RS256 signatures take ~40 s here.
Repetitions are interleaved (each repetition runs every case, the starting case rotating);
before each measured run the case runs once through its users (up to 5,000 checks), so what
is measured is its steady state. CPU is this process's (``time.process_time``); Redis' is
the Valkey process's, from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.parse import median, ratio

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
EXAMPLE = REPO / "examples" / "policy.yaml"
BIG_CACHE_MARGIN = 1.2  # the token cache of the users cases: every user's token fits
GRANT_WRITES_IN_FLIGHT = 256
WARM_MAX = 5000  # unmeasured checks before a measured run, at most
# Before each pass of a first-in-interval case its clock moves this far ahead: beyond the
# authorizer's refresh interval of lessons (60 s), so no check finds its user's last
# sighting fresh, however fast the passes run. The grants' evidence must stay within the
# example's elevated max_age (900 s): 3 repetitions are 7 passes, 427 s ahead at the end.
CLOCK_STEP_S = 61
# The returning case's users: above the 4,096 lessons the former process-local memory held,
# within the default token cache (10,000), so every measured check is a token-cache hit.
RETURNING_WINDOW = 8000


# -- the policies (pure) ---------------------------------------------------------------------
def example_policy() -> dict[str, Any]:
    import yaml

    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return doc


MATCHING_ROUTE = {"path_prefix": "/accounts/", "methods": ["GET", "HEAD"], "level": "elevated"}


def many_routes(n: int, *, match_last: bool) -> list[dict[str, Any]]:
    """``n`` routes: ``n - 1`` that never match ``GET /accounts/1`` (prefix, exact and regex
    in turn; every 10th bound to a host, every 5th to POST/PUT) and the matching one first
    or last."""
    others: list[dict[str, Any]] = []
    for i in range(n - 1):
        kind = i % 3
        route: dict[str, Any]
        if kind == 0:
            route = {"path_prefix": f"/svc{i}/"}
        elif kind == 1:
            route = {"path": f"/svc{i}/status"}
        else:
            route = {"path_regex": f"^/svc{i}/items/[0-9]+$"}
        if i % 10 == 9:
            route["host"] = f"svc{i}.example.com"
        if i % 5 == 4:
            route["methods"] = ["POST", "PUT"]
        route["level"] = ("standard", "elevated", "high")[i % 3]
        others.append(route)
    return [*others, MATCHING_ROUTE] if match_last else [MATCHING_ROUTE, *others]


def many_rules(n: int) -> list[dict[str, Any]]:
    """``n`` rules, none of which fires for ``GET /accounts/1`` from 127.0.0.1 without a
    device or GeoIP: each kind of condition the policy knows, in turn."""
    rules: list[dict[str, Any]] = []
    for i in range(n):
        kind = i % 6
        when: dict[str, Any]
        if kind == 0:
            when = {"ip_in": [f"198.18.{i % 256}.0/24", f"203.0.113.{i % 256}/32"]}
        elif kind == 1:
            when = {"ip_not_in": ["127.0.0.0/8", "10.0.0.0/8"]}
        elif kind == 2:
            when = {"country_in": ["KP", "IR"]}
        elif kind == 3:
            # not noncompliant/unmanaged: a posture rule makes an unattested device count
            # as noncompliant (fail closed), which would fire for a check without a device
            when = {"device": ["known"]}
        elif kind == 4:
            when = {"signals_any": ["impossible-travel", "velocity"]}
        else:
            when = {"level_at_least": "elevated", "ip_in": ["192.0.2.0/24"]}
        rule: dict[str, Any] = {"name": f"growth-{i}", "when": when}
        if i % 2:
            rule["deny"] = "ip-blocked"
        else:
            rule["raise_to"] = "high"
        rules.append(rule)
    return rules


def policies() -> dict[str, dict[str, Any]]:
    """Every policy the cases use, by name (the example as it is, and its variants)."""
    base = example_policy()
    out = {"example": base}
    for name, routes in (
        ("routes-first", many_routes(1000, match_last=False)),
        ("routes-last", many_routes(1000, match_last=True)),
    ):
        out[name] = {**base, "version": f"growth-{name}", "routes": routes}
    out["rules-0"] = {**base, "version": "growth-rules-0", "rules": []}
    out["rules-100"] = {**base, "version": "growth-rules-100", "rules": many_rules(100)}
    return out


def warm_size(users: int) -> int:
    """Unmeasured checks before each measured run: a pass over the users, 500 at least."""
    return min(WARM_MAX, max(users, 500))


# -- the cases ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    dimension: str
    title: str
    policy: str  # a key of policies()
    users: int = 1  # distinct users checked in rotation
    fresh_tokens: bool = False  # every check presents a token never seen before
    token_cache: int | None = None  # None: the default (oidc.token_cache_size)
    baseline: str = ""  # the case this one is compared with ("" = itself)
    # Every check is its user's first within the lesson refresh interval (see CLOCK_STEP_S).
    first_in_interval: bool = False
    # > 0: the warm pass checks this many users and the measured pass the same ones again.
    returning: int = 0


def cases(users: Sequence[int]) -> list[Case]:
    top = max(users, default=1)
    out = [
        Case("example", "policy size", "examples/policy.yaml (6 routes)", "example"),
        Case(
            "routes-first",
            "policy size",
            "1,000 routes, match first",
            "routes-first",
            baseline="example",
        ),
        Case(
            "routes-last",
            "policy size",
            "1,000 routes, match last",
            "routes-last",
            baseline="example",
        ),
        Case("rules-0", "rules", "0 rules", "rules-0"),
        Case("rules-100", "rules", "100 rules (none fires)", "rules-100", baseline="rules-0"),
        Case("users-1", "distinct users", "1 user", "example"),
    ]
    for n in users:
        if n > 1:
            out.append(
                Case(
                    f"users-{n}",
                    "distinct users",
                    f"{n:,} users (token cache holds them all)",
                    "example",
                    users=n,
                    token_cache=int(n * BIG_CACHE_MARGIN) + 10,
                    baseline="users-1",
                    first_in_interval=n > WARM_MAX,
                )
            )
    if top > 10_000:
        out.append(
            Case(
                f"users-{top}-default-cache",
                "distinct users",
                f"{top:,} users, default token cache (10,000)",
                "example",
                users=top,
                baseline="users-1",
                first_in_interval=True,
            )
        )
    if top > RETURNING_WINDOW:
        out.append(
            Case(
                f"users-{top}-returning",
                "distinct users",
                f"{top:,} users, {RETURNING_WINDOW:,} of them checked again within the minute",
                "example",
                users=top,
                baseline="users-1",
                returning=RETURNING_WINDOW,
            )
        )
    out += [
        Case("token-hit", "token cache", "one token (cache hit)", "example"),
        Case(
            "token-new",
            "token cache",
            "a new token every check (miss: RS256 + claims)",
            "example",
            fresh_tokens=True,
            baseline="token-hit",
        ),
    ]
    return out


# -- aggregation and the table (pure) ------------------------------------------------------------
def summarize(runs: Iterable[Mapping[str, Any]], all_cases: Sequence[Case]) -> list[dict[str, Any]]:
    """One row per case: medians over its repetitions, and ratios to its baseline's medians
    (CPU and Redis CPU per check)."""
    by: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["case"], []).append(r)
    rows: dict[str, dict[str, Any]] = {}
    for c in all_cases:
        rs = by.get(c.id, [])
        rows[c.id] = {
            "case": c.id,
            "dimension": c.dimension,
            "title": c.title,
            "reps": len(rs),
            "checks": sum(r["checks"] for r in rs),
            "not_allowed": sum(r["not_allowed"] for r in rs),
            "cpu_us_per_check": median(r["cpu_us_per_check"] for r in rs),
            "redis_us_per_check": median(r.get("redis_us_per_check") for r in rs),
            "baseline": c.baseline or c.id,
        }
    for row in rows.values():
        base = rows.get(row["baseline"])
        for key in ("cpu_us_per_check", "redis_us_per_check"):
            row[key.replace("_us_per_check", "_x_baseline")] = ratio(
                row[key], base[key] if base else None
            )
    return list(rows.values())


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(doc: Mapping[str, Any]) -> str:
    meta = doc["meta"]
    out = [
        "# stepup-authz: how a Check's cost grows",
        "",
        f"{meta['started']} · {meta['host']['cpus']} CPUs ({meta['host']['cpu_model']}) · "
        f"Python {meta['python']} · {meta['reps']} interleaved repetitions x {meta['n']:,} "
        f"checks per case, {meta['concurrency']} in flight; medians shown.",
        "",
        f"`{meta['command']}` — in process, the service's HTTP-mode path (bench/inproc.py: "
        "request head -> attributes -> Authorizer.check -> response bytes) over real Valkey "
        "through FastRedis, one service per case. `CPU`: this process's CPU per check "
        "(the service's code, its Redis client and the background `note_allow` writes); "
        "`Redis`: the Valkey process's CPU per check. `x base`: against the first case of "
        "the same dimension. The rows are described in bench/growth.py.",
        "",
        "| dimension | case | CPU us/check | x base | Redis us/check | x base | checks | "
        "not allowed |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["summary"]:
        out.append(
            f"| {r['dimension']} | {r['title']} | {_f(r['cpu_us_per_check'], '.0f')} | "
            f"{_f(r['cpu_x_baseline'], '.2f')} | {_f(r['redis_us_per_check'], '.1f')} | "
            f"{_f(r['redis_x_baseline'], '.2f')} | {r['checks']:,} | {r['not_allowed']} |"
        )
    out += ["", f"Wall time {meta['wall_s']:.0f} s.", ""]
    return "\n".join(out)


# -- the run -----------------------------------------------------------------------------------
@dataclass
class _Live:
    case: Case
    check: Any  # inproc.HttpPath
    authorizer: Any
    heads: Sequence[bytes]
    service: Any  # authz.app.Service
    offset: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)
    last: tuple[int, int] = (0, 1)  # the previous pass's (start, checks)
    skew: float = 0.0  # seconds the case's clock runs ahead (first_in_interval)

    def take(self, n: int, *, again: bool = False) -> tuple[Sequence[bytes], int, int]:
        """(heads, start, span) for the next ``n`` checks: check ``i`` presents
        ``heads[(start + i % span) % len(heads)]``. In rotation, or fresh ones never reused;
        ``again``: the previous pass's heads once more."""
        if again:
            start, span = self.last
            return self.heads, start, span
        start = self.offset
        self.offset += n
        if self.case.fresh_tokens and self.offset > len(self.heads):
            raise RuntimeError("ran out of fresh tokens")
        self.last = (start, n)
        return self.heads, start, n

    def step_clock(self) -> None:
        """A first-in-interval case: move its clock past the lessons' refresh interval."""
        if self.case.first_in_interval:
            self.skew += CLOCK_STEP_S


class Minter:
    """Access tokens as the dev IdP issues them: one from its token endpoint is the
    template; subject, session and ``jti`` vary; its own key signs."""

    def __init__(self, provider: Any, client_id: str) -> None:
        import jwt

        from authz.devidp.tokens import Authentication

        now = int(time.time())
        issued = provider.tokens.mint(
            client_id, Authentication("alice", "sid-template", now, "pwd", ("pwd",)), "openid", None
        )["access_token"]
        self.header = jwt.get_unverified_header(issued)
        self.claims = jwt.decode(issued, options={"verify_signature": False})
        self.key = provider.key.private_key
        self._jwt = jwt

    def token(self, user: int) -> tuple[str, dict[str, Any]]:
        claims = {
            **self.claims,
            "sub": f"user-{user:06d}",
            "sid": f"sid-{user:06d}",
            "jti": secrets.token_urlsafe(16),
        }
        headers = {k: v for k, v in self.header.items() if k in ("kid", "typ")}
        return str(self._jwt.encode(claims, self.key, algorithm="RS256", headers=headers)), claims


def _log(msg: str) -> None:
    print(f"[growth {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def _run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import yaml

    from authz.demo.stack import CLIENT_ID
    from bench import inproc
    from bench.stackctl import cpu_seconds

    all_cases = selected(args)
    docs = policies()
    async with inproc.local_environment(workdir, redis_url=args.redis_url) as env:
        pid = env.redis_pid
        redis_cpu = None if pid is None else (lambda: cpu_seconds(pid))
        minter = Minter(env.provider, CLIENT_ID)
        top = max(c.users for c in all_cases)
        _log(f"minting {top:,} user tokens (RS256, the IdP's key)")
        t0 = time.monotonic()
        user_tokens = [minter.token(i) for i in range(top)]
        wants_fresh = any(c.fresh_tokens for c in all_cases)
        fresh_n = args.reps * (args.n + warm_size(1)) + 1 if wants_fresh else 0
        fresh = [minter.token(0)[0] for _ in range(fresh_n)]
        _log(f"minted {top + fresh_n:,} tokens in {time.monotonic() - t0:.0f} s")
        heads = [inproc.http_check_head(t) for t, _ in user_tokens]
        fresh_heads = [inproc.http_check_head(t) for t in fresh]
        del fresh
        live: list[_Live] = []
        try:
            for c in all_cases:
                policy_file = workdir / f"policy-{c.policy}.yaml"
                if not policy_file.exists():
                    policy_file.write_text(yaml.safe_dump(docs[c.policy], sort_keys=False))
                oidc = {} if c.token_cache is None else {"token_cache_size": c.token_cache}
                config = env.write_settings(policy_file, name=f"config-{c.id}", oidc=oidc)
                settings = inproc.in_process_settings(
                    config, redis={"deadline_ms": args.deadline_ms}
                )
                service = await inproc.start(settings)
                check = inproc.HttpPath(service.authorizer, settings)
                case_heads = fresh_heads if c.fresh_tokens else heads[: c.users]
                lv = _Live(c, check, service.authorizer, case_heads, service)
                if c.first_in_interval:
                    service.authorizer.clock = _ahead(lv)
                live.append(lv)
            store = live[0].authorizer.store
            _log(f"writing {top:,} grants through the store")
            t0 = time.monotonic()
            now = int(time.time())
            for i in range(0, top, GRANT_WRITES_IN_FLIGHT):
                batch = user_tokens[i : i + GRANT_WRITES_IN_FLIGHT]
                await asyncio.gather(
                    *(
                        inproc.write_grant(store, claims, "elevated", 3600, now)
                        for _, claims in batch
                    )
                )
            _log(f"wrote the grants in {time.monotonic() - t0:.0f} s")
            del user_tokens
            # The harness's own heap (100k request heads, the minted tokens, every case's
            # service) out of the cyclic GC, as `serve` freezes its start-up objects: a
            # service does not hold the load generator's objects, so their collection
            # passes are not a check's cost (they stalled checks past Envoy's deadline).
            gc.collect()
            gc.freeze()
            for lv in live:  # every case allows, and has seen each of its users once
                first = await lv.check.once(lv.heads[0])
                if first != 200:
                    raise SystemExit(f"bench.growth: case {lv.case.id} did not allow ({first})")
                if lv.case.token_cache is not None:  # it can hold them all: fill it
                    _log(f"{lv.case.id}: one pass over its {lv.case.users:,} users")
                    await _pass(lv, lv.case.users, args.concurrency)
            for rep in range(args.reps):
                k = rep % len(live)
                for lv in live[k:] + live[:k]:
                    warm = lv.case.returning or warm_size(lv.case.users)
                    await _pass(lv, warm, args.concurrency)
                    again = lv.case.returning > 0
                    r = await _pass(lv, args.n, args.concurrency, redis_cpu=redis_cpu, again=again)
                    run = {"case": lv.case.id, "rep": rep, **r.as_dict()}
                    lv.runs.append(run)
                    _log(
                        f"rep {rep} {lv.case.id}: {run['cpu_us_per_check']:.0f} us/check"
                        + (
                            ""
                            if run["redis_us_per_check"] is None
                            else f", Redis {run['redis_us_per_check']:.1f}"
                        )
                    )
        finally:
            for lv in live:
                await lv.service.stop()
    runs = [r for lv in live for r in lv.runs]
    return {"cases": [c.__dict__ for c in all_cases], "runs": runs}


def _ahead(lv: _Live) -> Any:
    """The wall clock, ``lv.skew`` seconds ahead."""
    return lambda: time.time() + lv.skew


async def _pass(
    lv: _Live, n: int, concurrency: int, redis_cpu: Any = None, *, again: bool = False
) -> Any:
    from bench import inproc

    lv.step_clock()
    heads, start, span = lv.take(n, again=again)
    size = len(heads)
    check = lv.check

    async def one(i: int) -> int:
        return int(await check.once(heads[(start + i % span) % size]))

    return await inproc.closed_loop(
        one, n, concurrency, drain=lv.authorizer.drain, redis_cpu=redis_cpu
    )


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


DIMENSIONS = {
    "policy": "policy size",
    "rules": "rules",
    "users": "distinct users",
    "tokens": "token cache",
}


def selected(args: argparse.Namespace) -> list[Case]:
    """The cases of the dimensions asked for (``--dimension``; all by default)."""
    wanted = {DIMENSIONS[d] for d in args.dimension} if args.dimension else set(DIMENSIONS.values())
    return [c for c in cases(args.users) if c.dimension in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.growth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, help="measured checks per case and repetition (5000)")
    p.add_argument("--reps", type=int, help="interleaved repetitions (default 3)")
    p.add_argument("--concurrency", type=int, default=32, help="checks in flight (default 32)")
    p.add_argument("--users", help="distinct-user counts besides 1 (default 1000,100000)")
    p.add_argument("--redis-url", help="default: an embedded Valkey (its CPU is then reported)")
    p.add_argument("--deadline-ms", type=int, default=2000, help="the store's Redis deadline")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 x 1000, users 1000,20000")
    p.add_argument(
        "--dimension",
        action="append",
        choices=sorted(DIMENSIONS),
        help="only this dimension's cases (repeatable; default: all)",
    )
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = p.parse_args(argv)
    args.n = args.n or (1000 if args.quick else 5000)
    args.reps = args.reps or (1 if args.quick else 3)
    users = args.users or ("1000,20000" if args.quick else "1000,100000")
    args.users = [int(u) for u in users.split(",") if u]
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    t0 = time.monotonic()
    import uvloop

    with tempfile.TemporaryDirectory(prefix="stepup-growth-") as tmp:
        result = uvloop.run(_run(args, Path(tmp)))
    all_cases = selected(args)
    doc: dict[str, Any] = {
        "meta": {
            "started": started,
            "wall_s": round(time.monotonic() - t0, 1),
            "n": args.n,
            "reps": args.reps,
            "concurrency": args.concurrency,
            "users": args.users,
            "python": platform.python_version(),
            "host": {"cpus": os.cpu_count(), "cpu_model": _cpu_model()},
            "command": "python -m bench.growth " + " ".join(sys.argv[1:] if argv is None else argv),
        },
        **result,
        "summary": summarize(result["runs"], all_cases),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "growth.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    (args.out / "growth.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
