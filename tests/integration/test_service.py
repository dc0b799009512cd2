"""The whole service in-process: real gRPC stub on port 0, real Redis, the dev IdP on
loopback, and the step-up round trip over real HTTP (no Envoy: that is tests/e2e)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import grpc
import pyotp
import pytest
import redis.asyncio as aioredis
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz.app import Service, start_service
from authz.audit.testing import dev_mac_settings
from authz.check.response import METHOD_OVERRIDE_HEADERS
from authz.config.settings import Settings
from authz.devidp import ALICE_TOTP_SECRET, DevClient, DevIdpConfig, base_url, bind, running

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = "http://app.test"


@dataclass
class Env:
    service: Service
    idp: str
    stub: external_auth_pb2_grpc.AuthorizationStub
    channel: grpc.aio.Channel


@contextlib.asynccontextmanager
async def service_env(redis_url: str, redis_prefix: str, **extra: Any) -> AsyncIterator[Env]:
    sock = bind()
    idp = base_url(sock)
    cfg = DevIdpConfig(
        issuer=idp,
        clients={"stepup-authz": DevClient("dev-secret", (f"{PUBLIC}/_stepup/callback",))},
    )
    async with running(cfg, sock):
        settings = Settings.model_validate(
            {
                "policy_file": str(ROOT / "examples" / "policy.yaml"),
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
                **extra,
                "audit": {**dev_mac_settings(), **extra.get("audit", {})},
            }
        )
        service = await start_service(settings)
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


def check_request(
    path: str, headers: dict[str, str], *, method: str = "GET", ip: str = "10.0.0.5"
) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host, http.scheme = method, path, "app.test", "https"
    http.headers.update(headers)
    req.attributes.source.address.socket_address.address = ip
    return req


def header(resp: external_auth_pb2.CheckResponse, name: str) -> str | None:
    hs = resp.ok_response.headers if resp.HasField("ok_response") else resp.denied_response.headers
    for h in hs:
        if h.header.key == name:
            return str(h.header.value)
    return None


async def password_token(idp: str, *, otp: str | None = None) -> str:
    form = {"grant_type": "password", "username": "alice", "password": "alice-password"}
    if otp:
        form["otp"] = otp
    basic = base64.b64encode(b"stepup-authz:dev-secret").decode()
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{idp}/token", data=form, headers={"Authorization": f"Basic {basic}"}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
    return str(body["access_token"])


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
    assert list(r.ok_response.headers_to_remove) == ["x-stepup-role", *METHOD_OVERRIDE_HEADERS]
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
    mfa = await password_token(env.idp, otp=pyotp.TOTP(ALICE_TOTP_SECRET).now())
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
        async with s.get(authorize, allow_redirects=False) as resp:
            page = await resp.text()
        request_id = re.search(r'name="request_id" value="([^"]+)"', page)
        assert request_id is not None, page
        form = {
            "request_id": request_id.group(1),
            "username": "alice",
            "password": "alice-password",
            "otp": pyotp.TOTP(ALICE_TOTP_SECRET).now(),
        }
        async with s.post(f"{env.idp}/authorize", data=form, allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            callback = resp.headers["Location"]
        cb = urlsplit(callback)
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
        mfa = await password_token(env.idp, otp=pyotp.TOTP(ALICE_TOTP_SECRET).now())
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
