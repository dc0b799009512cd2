"""Python CPU per Check outside grpcio: the servicer's ``Check`` called directly, in process,
with real objects (the composition root's Authorizer, token verifier, Redis session store
and response builder; the dev IdP for the token; Valkey or REDIS_URL for the grant).

``python -m bench.micro [--n 20000] [--concurrency 32] [--redis-url URL] [--slow-client]``

Each call does what grpcio hands the servicer and takes back: the CheckRequest parsed from
the bytes Envoy would send, ``AuthorizationServicer.Check`` (attributes, token cache, one
EVALSHA read, rules, decision, metrics, response), the response serialised; the background
``note_allow`` write is included (it runs on the same loop). CPU is ``time.process_time``
of this process over the run, divided by the Checks: it excludes grpcio's per-call cost
(~200 us, measured separately through Envoy) and Redis' own CPU (another process).
``--slow-client`` runs the store's scripts over redis-py instead of FastRedis (the before).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import uvloop
from envoy.service.auth.v3 import external_auth_pb2

from authz.app import start_service
from authz.audit.testing import dev_mac_settings
from authz.check.grpc_server import AuthorizationServicer
from authz.check.response import ResponseBuilder
from authz.config.settings import Settings
from authz.core.session import Evidence, Grant, session_key, user_key
from authz.devidp import DevClient, DevIdpConfig, base_url, bind, running

REPO = Path(__file__).resolve().parent.parent


async def _token(idp: str) -> str:
    import base64

    import aiohttp

    form = {"grant_type": "password", "username": "alice", "password": "alice-password"}
    basic = base64.b64encode(b"stepup-authz:dev-secret").decode()
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{idp}/token", data=form, headers={"Authorization": f"Basic {basic}"}) as resp,
    ):
        body: dict[str, Any] = await resp.json()
    return str(body["access_token"])


def _request(token: str, path: str = "/accounts/1") -> bytes:
    """A CheckRequest as Envoy sends it for ``GET <path>`` (wrk's headers)."""
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address = "127.0.0.1"
    a.source.address.socket_address.port_value = 40000
    a.destination.address.socket_address.address = "127.0.0.1"
    a.destination.address.socket_address.port_value = 8080
    http = a.request.http
    http.id, http.method, http.path, http.host = "1234567890", "GET", path, "127.0.0.1"
    http.scheme, http.protocol = "http", "HTTP/1.1"
    http.headers.update(
        {
            ":authority": "127.0.0.1:8080",
            ":method": "GET",
            ":path": path,
            ":scheme": "http",
            "authorization": f"Bearer {token}",
            "x-forwarded-proto": "http",
            "x-request-id": "7a1c3a2e-3f4b-4b7e-9d0e-000000000000",
        }
    )
    return req.SerializeToString()


async def run(args: argparse.Namespace) -> dict[str, float]:
    sock = bind()
    idp = base_url(sock)
    cfg = DevIdpConfig(
        issuer=idp,
        clients={"stepup-authz": DevClient("dev-secret", ("http://app.test/_stepup/callback",))},
    )
    async with running(cfg, sock):
        # A generous deadline: a profiler's overhead must not turn reads into failures.
        redis: dict[str, Any] = {"fast_client": not args.slow_client, "deadline_ms": 2000}
        if args.redis_url:
            redis["url"] = args.redis_url
        settings = Settings.model_validate(
            {
                "policy_file": str(REPO / "examples" / "policy.yaml"),
                "grpc": {"port": 0, "shutdown_delay_s": 0},
                "http": {"port": 0},
                "redis": redis,
                "oidc": {
                    "issuer": idp,
                    "client_id": "stepup-authz",
                    "client_secret": "dev-secret",
                    "audience": "stepup-demo",
                    "algorithms": ["RS256"],
                    "token_typ": "at+jwt",
                },
                "stepup": {"public_url": "http://app.test", "cookie_secure": False},
                "log": {"level": "INFO"},
                # --audited: GET /wires/1 (`high`), allowed only after its durable XADD.
                "audit": {
                    "enabled": args.audit or args.audited,
                    "durable_level": "high" if args.audited else None,
                    **dev_mac_settings(),
                },
            }
        )
        service = await start_service(settings)
        try:
            token = await _token(idp)
            claims = jwt.decode(token, options={"verify_signature": False})
            now = int(time.time())
            await service.authorizer.store.write_grant(  # type: ignore[attr-defined]
                user_key(claims["iss"], claims["sub"]),
                session_key(claims["iss"], claims["sub"], claims["sid"]),
                Grant(
                    "high" if args.audited else "elevated",
                    Evidence("mfa", ("pwd", "otp"), now),
                    now + 3600,
                    now,
                ),
                now,
            )
            servicer = AuthorizationServicer(service.authorizer, ResponseBuilder())
            raw = _request(token, "/wires/1" if args.audited else "/accounts/1")

            async def one() -> int:
                req = external_auth_pb2.CheckRequest.FromString(raw)
                resp = await servicer.Check(req, None)
                resp.SerializeToString()
                return int(resp.status.code)

            assert await one() == 0, "the allow path must allow"
            for _ in range(200):  # warm caches, connections, the JIT-less interpreter
                await one()
            await service.authorizer.drain()
            conc = args.concurrency
            batches = max(1, args.n // conc)
            failed = 0
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(batches):
                codes = await asyncio.gather(*(one() for _ in range(conc)))
                failed += sum(1 for c in codes if c)
            await service.authorizer.drain()
            c1, t1 = time.process_time(), time.perf_counter()
            n = batches * conc
            return {
                "checks": n,
                "failed": failed,
                "cpu_us_per_check": (c1 - c0) / n * 1e6,
                "wall_us_per_check": (t1 - t0) / n * 1e6,
            }
        finally:
            await service.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.micro",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--redis-url", help="default: an embedded Valkey")
    p.add_argument("--slow-client", action="store_true", help="scripts over redis-py")
    p.add_argument("--audit", action="store_true", help="audit enabled (buffered; default off)")
    p.add_argument(
        "--audited",
        action="store_true",
        help="GET /wires/1 at `high` with audit before access (a durable XADD "
        "per Check): the audited allow's Python cost against the default",
    )
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
    print(
        f"{res['checks']:.0f} checks, concurrency {args.concurrency}, "
        f"{'redis-py' if args.slow_client else 'FastRedis'}: "
        f"{res['cpu_us_per_check']:.1f} us CPU per check "
        f"({res['wall_us_per_check']:.1f} us wall); not allowed: {res['failed']:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
