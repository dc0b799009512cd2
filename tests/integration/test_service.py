"""The whole service in-process: real gRPC stub on port 0, real Redis, the dev IdP on
loopback, and the step-up round trip over real HTTP (no Envoy: that is tests/e2e). Time is
the injected clock where a test moves it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import grpc
import pytest
import redis.asyncio as aioredis
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz.app import Service, start_service
from authz.audit.testing import dev_mac_settings
from authz.check.response import METHOD_OVERRIDE_HEADERS
from authz.config.settings import Settings
from authz.demo.stack import deep_merge
from authz.devidp import DevClient, DevIdpConfig, base_url, bind, running
from tests.builders import FakeClock, check_request, idp_sign_in, password_token
from tests.builders import response_header as header

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = "http://app.test"


@dataclass
class Env:
    service: Service
    idp: str
    stub: external_auth_pb2_grpc.AuthorizationStub
    channel: grpc.aio.Channel

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.service.http_port}"


@contextlib.asynccontextmanager
async def service_env(
    redis_url: str,
    redis_prefix: str,
    *,
    policy_file: Path = ROOT / "examples" / "policy.yaml",
    clock: Callable[[], float] = time.time,
    **extra: Any,
) -> AsyncIterator[Env]:
    """The service and the dev IdP, both on ``clock``; ``extra`` is merged into the
    settings."""
    sock = bind()
    idp = base_url(sock)
    cfg = DevIdpConfig(
        issuer=idp,
        clients={"stepup-authz": DevClient("dev-secret", (f"{PUBLIC}/_stepup/callback",))},
        clock=clock,
    )
    async with running(cfg, sock):
        base: dict[str, Any] = {
            "policy_file": str(policy_file),
            "grpc": {"port": 0, "shutdown_delay_s": 0},
            "http": {"port": 0},
            "redis": {"url": redis_url, "key_prefix": redis_prefix},
            "oidc": {
                "issuer": idp,
                "client_id": "stepup-authz",
                "client_secret": "dev-secret",
                "audience": "stepup-demo",
                "algorithms": ["RS256"],
                "token_typ": "at+jwt",
            },
            "stepup": {"public_url": PUBLIC, "cookie_secure": False},
            "audit": dev_mac_settings(),
        }
        settings = Settings.model_validate(deep_merge(base, extra))
        service = await start_service(settings, clock=clock)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        try:
            yield Env(service, idp, external_auth_pb2_grpc.AuthorizationStub(channel), channel)
        finally:
            await channel.close()
            await service.stop()


@pytest.fixture
async def env(redis_url: str, redis_prefix: str) -> AsyncIterator[Env]:
    async with service_env(redis_url, redis_prefix) as e:
        yield e


async def test_health_and_reflection_serving(env: Env) -> None:
    health = health_pb2_grpc.HealthStub(env.channel)
    for name in ("", "envoy.service.auth.v3.Authorization"):
        r = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert r.status == health_pb2.HealthCheckResponse.SERVING


async def test_decisions_over_grpc(env: Env) -> None:
    # no credentials: browser redirect vs API 401
    r = await env.stub.Check(check_request("/accounts/1", {"accept": "text/html"}))
    assert r.status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert r.denied_response.status.code == 302
    assert header(r, "location") == "/_stepup/login?rd=%2Faccounts%2F1"
    r = await env.stub.Check(check_request("/accounts/1", {}))
    assert r.denied_response.status.code == 401
    assert header(r, "www-authenticate") == 'Bearer realm="stepup-authz"'
    assert header(r, "x-stepup-reason") == "no-credentials"
    assert r.dynamic_metadata["decision_id"] == header(r, "x-stepup-decision-id")

    token = await password_token(env.idp)
    auth = {"authorization": f"Bearer {token}"}
    # standard route: allowed, identity headers set, forged ones removed
    r = await env.stub.Check(
        check_request("/news", {**auth, "x-stepup-user": "mallory", "x-stepup-role": "admin"})
    )
    assert r.status.code == 0
    assert header(r, "x-stepup-user") == "alice"
    assert header(r, "x-stepup-level") == "standard"
    assert header(r, "x-stepup-acr") == "pwd"
    # client x-stepup-* copies, and method overrides always (tests/security)
    # (x-stepup-peer-address: Envoy's address for the check, never the upstream's)
    assert sorted(r.ok_response.headers_to_remove) == sorted(
        ["x-stepup-role", "x-stepup-peer-address", *METHOD_OVERRIDE_HEADERS]
    )
    # elevated route with a password token: RFC 9470 challenge
    r = await env.stub.Check(check_request("/accounts/1", auth))
    assert r.denied_response.status.code == 401
    assert header(r, "www-authenticate") == (
        'Bearer realm="stepup-authz", error="insufficient_user_authentication", '
        'error_description="A different authentication level is required", '
        'acr_values="mfa phr", max_age=900'
    )
    # gRPC clients get the same 401 (Envoy maps it to UNAUTHENTICATED)
    r = await env.stub.Check(
        check_request(
            "/accounts/1", {**auth, "content-type": "application/grpc", "accept": "text/html"}
        )
    )
    assert r.denied_response.status.code == 401
    # rule deny: 403 with the reason
    r = await env.stub.Check(check_request("/news", auth, ip="198.51.100.9"))
    assert r.denied_response.status.code == 403
    assert r.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert header(r, "x-stepup-reason") == "ip-blocked"
    # a path we cannot canonicalise is refused
    r = await env.stub.Check(check_request("/accounts%2F1", auth))
    assert (r.denied_response.status.code, header(r, "x-stepup-reason")) == (403, "bad-path")
    # a garbage token is a login, with the invalid_token error
    r = await env.stub.Check(check_request("/news", {"authorization": "Bearer abc.def.ghi"}))
    assert r.denied_response.status.code == 401
    assert 'error="invalid_token"' in (header(r, "www-authenticate") or "")
    # an mfa token satisfies elevated by itself
    mfa = await password_token(env.idp, otp=True)
    r = await env.stub.Check(check_request("/accounts/1", {"authorization": f"Bearer {mfa}"}))
    assert r.status.code == 0 and header(r, "x-stepup-acr") == "mfa"


async def test_browser_step_up_round_trip(env: Env) -> None:
    token = await password_token(env.idp)
    http = f"http://127.0.0.1:{env.service.http_port}"
    jar = {"stepup-token": token}
    # the Check's redirect carries the signed device/IP context
    r = await env.stub.Check(
        check_request(
            "/accounts/1?tab=2", {"cookie": f"stepup-token={token}", "accept": "text/html"}
        )
    )
    start = header(r, "location")
    assert start is not None and start.startswith(
        "/_stepup/start?level=elevated&rd=%2Faccounts%2F1%3Ftab%3D2&ctx="
    )
    async with aiohttp.ClientSession() as s:
        # a start link without (or with a forged) context is refused
        async with s.get(
            f"{http}/_stepup/start",
            params={"level": "elevated", "rd": "/x"},
            cookies=jar,
            allow_redirects=False,
        ) as resp:
            assert resp.status == 400
        async with s.get(f"{http}{start}x", cookies=jar, allow_redirects=False) as resp:
            assert resp.status == 400
        # start: stores state, sets the state cookie, redirects to the IdP with the challenge
        async with s.get(f"{http}{start}", cookies=jar, allow_redirects=False) as resp:
            assert resp.status == 302
            authorize = resp.headers["Location"]
            state_cookie = resp.cookies["stepup-state"].value
        q = parse_qs(urlsplit(authorize).query)
        assert q["acr_values"] == ["mfa phr"] and q["max_age"] == ["900"]
        assert q["prompt"] == ["login"] and q["code_challenge_method"] == ["S256"]
        # the IdP's login form, with TOTP
        cb = urlsplit(await idp_sign_in(s, authorize))
        callback_here = f"{http}{cb.path}?{cb.query}"
        # a foreign browser (no state cookie) is refused and does not consume the state
        async with s.get(callback_here, allow_redirects=False) as resp:
            assert resp.status == 400
        async with s.get(
            callback_here, cookies={"stepup-state": state_cookie}, allow_redirects=False
        ) as resp:
            assert resp.status == 303, await resp.text()
            assert resp.headers["Location"] == "/accounts/1?tab=2"
        # replaying the callback: the state was used once
        async with s.get(
            callback_here, cookies={"stepup-state": state_cookie}, allow_redirects=False
        ) as resp:
            assert resp.status == 400
    # the retried request is allowed by the grant
    r = await env.stub.Check(check_request("/accounts/1", {"cookie": f"stepup-token={token}"}))
    assert r.status.code == 0, r
    assert header(r, "x-stepup-acr") == "mfa"
    metrics = await asyncio.to_thread(_scrape, http)
    assert (
        'stepup_authz_stepup_completions_total{factor="otp",level="elevated",result="success"} 1.0'
    ) in metrics


BRIEF_POLICY = """\
levels:
  standard: {}
  brief: {acr: [mfa], max_age: 60}
routes:
  - {path_prefix: /brief/, level: brief}
default_level: standard
"""


async def step_up(env: Env, token: str, path: str, now: float) -> None:
    """The browser round trip: the Check's redirect -> /_stepup/start -> the IdP's form
    (password and a TOTP code for ``now``) -> the callback -> 303 back to ``path``."""
    cookie = {"cookie": f"stepup-token={token}", "accept": "text/html"}
    start = header(await env.stub.Check(check_request(path, cookie)), "location")
    assert start is not None and start.startswith("/_stepup/start?"), start
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"{env.http}{start}", cookies={"stepup-token": token}, allow_redirects=False
        ) as resp:
            assert resp.status == 302, await resp.text()
            authorize = resp.headers["Location"]
            state_cookie = resp.cookies["stepup-state"].value
        cb = urlsplit(await idp_sign_in(s, authorize, now=now))
        async with s.get(
            f"{env.http}{cb.path}?{cb.query}",
            cookies={"stepup-state": state_cookie},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 303, await resp.text()
            assert resp.headers["Location"] == path


async def test_grant_expiry_challenges_again(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """A grant lasts until auth_time + max_age (60 s, no leeway), on the service's clock:
    the retried request is allowed until then, and a step-up again after. The IdP runs on
    the same clock, so auth_time is the clock's too. The grant's Redis key lives 60 real
    seconds, far longer than the test; Redis dropping a key at its TTL is
    tests/faults/test_redis_faults.py."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(BRIEF_POLICY)
    clock = FakeClock(int(time.time()))  # near real time: the store's key TTLs are real
    async with service_env(
        redis_url, redis_prefix, policy_file=policy, clock=clock, oidc={"leeway_s": 0}
    ) as env:
        token = await password_token(env.idp)
        browser = {"cookie": f"stepup-token={token}", "accept": "text/html"}
        await step_up(env, token, "/brief/x", clock())
        assert (await env.stub.Check(check_request("/brief/x", browser))).status.code == 0
        clock.advance(59)
        assert (await env.stub.Check(check_request("/brief/x", browser))).status.code == 0
        clock.advance(2)  # 61 s after the step-up: past auth_time + 60 s
        r = await env.stub.Check(check_request("/brief/x", browser))
        assert r.denied_response.status.code == 302
        assert (header(r, "location") or "").startswith("/_stepup/start?level=brief"), r


def _scrape(http: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{http}/metrics") as resp:  # noqa: S310 - loopback test URL
        return str(resp.read().decode())


async def test_store_down_fails_closed(env: Env) -> None:
    token = await password_token(env.idp)
    await env.service.authorizer.store.aclose()  # type: ignore[attr-defined]
    env.service.authorizer.store.deadline = 0.05  # type: ignore[attr-defined]
    r = await env.stub.Check(check_request("/accounts/1", {"authorization": f"Bearer {token}"}))
    assert r.status.code != 0


async def test_audit_stdout_mirror_writes_the_records_the_stream_got(
    redis_url: str, redis_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """audit.stdout: every record also goes to stdout as one JSON line (from the mirror's
    own thread), the same bytes as the stream entry; a durable allow included."""
    stream = f"{redis_prefix}audit-stdout"
    async with service_env(
        redis_url, redis_prefix, audit={"stdout": True, "stream_key": stream}
    ) as env:
        mfa = await password_token(env.idp, otp=True)
        r = await env.stub.Check(check_request("/accounts/1", {"authorization": f"Bearer {mfa}"}))
        assert r.status.code == 0  # elevated: audited before access
        r = await env.stub.Check(check_request("/accounts/1", {}))
        assert r.denied_response.status.code == 401  # login.required, buffered
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries = [f[b"r"] for _, f in await client.xrange(stream)]
        await client.delete(stream)
    finally:
        await client.aclose()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert sorted(lines) == sorted(e.decode() for e in entries)
    assert {json.loads(ln)["type"] for ln in lines} >= {"access.allowed", "login.required"}
