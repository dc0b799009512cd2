"""Starting degraded: an IdP that is down, hangs or answers 404 while the service starts,
and a Redis that is down, do not stop it. It serves /healthz, says not ready on /readyz
until the IdP's keys are in, refuses what needs them with a reason and a log line carrying
the decision id, and is ready by itself once they answer (authz/stepup/provider.py,
authz/ops/degraded.py).

Every dependency is a real socket on loopback: bound and not listening (refused), listening
and never answering (hanging), an aiohttp app answering 404; then the real dev IdP on that
same socket. Redis is a private Valkey, stopped and started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.app import Service, start_service
from authz.config.settings import Settings
from authz.demo.stack import deep_merge
from authz.devidp import DevClient, DevIdpConfig, base_url, bind, create_app, running
from authz.ops.logs import JsonFormatter
from authz.stepup.ciba.service import CibaSlot
from authz.store.connections import EmbeddedValkey
from tests.builders import (
    async_wait_until,
    check_request,
    password_token,
    response_header,
    rsa_key,
    sign,
    token_claims,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "examples" / "policy.yaml"
PUBLIC = "http://app.test"
FAST_RETRY = {"start_retry_initial_s": 0.05, "start_retry_max_s": 0.2}


def idp_config(issuer: str) -> DevIdpConfig:
    return DevIdpConfig(
        issuer=issuer,
        clients={"stepup-authz": DevClient("dev-secret", (f"{PUBLIC}/_stepup/callback",))},
    )


def service_settings(issuer: str, redis_url: str, prefix: str) -> dict[str, Any]:
    return {
        "policy_file": str(POLICY),
        "grpc": {"port": 0, "shutdown_delay_s": 0},
        "http": {"port": 0},
        "redis": {"url": redis_url, "key_prefix": prefix},
        "oidc": {
            "issuer": issuer,
            "client_id": "stepup-authz",
            "client_secret": "dev-secret",
            "audience": "stepup-demo",
            "algorithms": ["RS256"],
            "token_typ": "at+jwt",
            "http_timeout_s": 0.3,
            "jwks_timeout_s": 0.3,
            **FAST_RETRY,
        },
        "stepup": {"public_url": PUBLIC, "cookie_secure": False},
        "audit": {"enabled": False},
    }


@contextlib.asynccontextmanager
async def service(settings: dict[str, Any]) -> AsyncIterator[Service]:
    svc = await start_service(Settings.model_validate(settings))
    try:
        yield svc
    finally:
        await svc.stop()


async def get(url: str, **kw: Any) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.get(url, allow_redirects=False, **kw) as r:
        return r.status, await r.text(), dict(r.headers)


def json_lines(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, Any]]:
    """The records logged with ``message``, as the JSON lines the service writes."""
    fmt = JsonFormatter()
    return [json.loads(fmt.format(r)) for r in caplog.records if r.getMessage() == message]


def answering_404(sock: socket.socket) -> tuple[Callable[[], None], web.Application]:
    """The dev IdP for ``sock`` behind a switch: every request answers 404 until the
    returned function is called."""
    broken = True

    @web.middleware
    async def not_found(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if broken:
            return web.Response(status=404, text="not here")
        return await handler(request)

    def mend() -> None:
        nonlocal broken
        broken = False

    app = create_app(idp_config(base_url(sock)))
    app.middlewares.append(not_found)
    return mend, app


def rogue_token(issuer: str) -> str:
    claims = token_claims(iss=issuer, aud="stepup-demo")
    return sign(rsa_key("never-published"), claims, typ="at+jwt")


@pytest.mark.parametrize("fault", ["refused", "hanging", "404"])
async def test_an_idp_that_does_not_answer_at_start_leaves_the_service_up_until_it_does(
    fault: str, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sock = bind()
    issuer = base_url(sock)
    mend: Callable[[], None] | None = None
    async with contextlib.AsyncExitStack() as stack:
        if fault == "hanging":
            sock.listen(16)  # the kernel accepts; nobody ever reads or answers
        elif fault == "404":
            mend, app = answering_404(sock)
            runner = web.AppRunner(app)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.SockSite(runner, sock).start()
        svc = await stack.enter_async_context(
            service(service_settings(issuer, redis_url, redis_prefix))
        )
        http = f"http://127.0.0.1:{svc.http_port}"

        # Up, not ready, and it said why once at start.
        assert (await get(f"{http}/healthz"))[0] == 200
        status, body, _ = await get(f"{http}/readyz")
        assert status == 503 and "keys: FAIL" in body, body
        (started,) = json_lines(
            caplog,
            "the identity provider is not reachable: starting "
            "degraded; step-ups and Checks that need a token are refused "
            "until it answers",
        )
        assert started["level"] == "warning" and started["issuer"] == issuer
        assert started["error"], started

        # A Check with a token is refused for that reason, with its log line.
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{svc.grpc_port}")
        stack.push_async_callback(channel.close)
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        auth = {"authorization": f"Bearer {rogue_token(issuer)}"}
        r = await stub.Check(check_request("/news", auth))
        assert response_header(r, "x-stepup-reason") == "keys-unavailable"
        decision = response_header(r, "x-stepup-decision-id")
        (line,) = [x for x in json_lines(caplog, "denied") if x["decision_id"] == decision]
        assert line["reason"] == "keys-unavailable"

        # A browser sign-in gets a page saying so, with the reference that is in the log.
        status, page, _ = await get(f"{http}/_stepup/login?rd=/accounts/1")
        assert status == 503 and "not reachable yet" in page, page
        (refused,) = json_lines(caplog, "step-up refused")
        assert refused["reason"] == "idp-unavailable"
        assert refused["decision_id"] in page
        assert 'href="/accounts/1"' in page

        # The IdP comes up (on the same socket): ready by itself, and everything works.
        if mend is not None:
            mend()
        else:
            await stack.enter_async_context(running(idp_config(issuer), sock))
        await async_wait_until(lambda: svc.health.keys_ready(), "the keys to load", timeout_s=15)
        status, body, _ = await get(f"{http}/readyz")
        assert status == 200, body
        assert json_lines(caplog, "the identity provider answered: keys loaded, ready")
        token = await password_token(issuer)
        r = await stub.Check(check_request("/news", {"authorization": f"Bearer {token}"}))
        assert r.status.code == 0, r
        status, _, headers = await get(f"{http}/_stepup/login?rd=/accounts/1")
        assert status == 302 and headers["Location"].startswith(f"{issuer}/authorize?")
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_redis_down_at_start_is_a_warning_and_the_service_recovers(
    embedded_valkey: EmbeddedValkey, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = embedded_valkey.url
    await asyncio.to_thread(embedded_valkey.stop)
    sock = bind()
    issuer = base_url(sock)
    async with (
        running(idp_config(issuer), sock),
        service(service_settings(issuer, url, redis_prefix)) as svc,
    ):
        http = f"http://127.0.0.1:{svc.http_port}"
        (warned,) = json_lines(
            caplog,
            "the session store is not reachable: starting degraded; step-ups and Checks "
            "that need a session are refused until it answers",
        )
        assert warned["store"] == f"127.0.0.1:{embedded_valkey.port}", warned
        # a sign-in needs the store: refused, and the log line names why
        status, page, _ = await get(f"{http}/_stepup/login?rd=/accounts/1")
        assert status == 503, page
        (refused,) = json_lines(caplog, "step-up refused")
        assert refused["reason"] == "store-error" and refused["decision_id"] in page

        await asyncio.to_thread(embedded_valkey.start)
        await async_wait_until(
            lambda: json_lines(caplog, "the session store answered"),
            "the store to answer",
            timeout_s=15,
        )
        await async_wait_until(lambda: _status(f"{http}/readyz", 200), "ready", timeout_s=15)
        status, _, headers = await get(f"{http}/_stepup/login?rd=/accounts/1")
        assert status == 302 and headers["Location"].startswith(issuer), headers
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def _status(url: str, want: int) -> bool:
    try:
        return (await get(url))[0] == want
    except aiohttp.ClientConnectionError:  # not listening yet
        return False


async def test_serve_with_the_idp_down_keeps_running_without_a_traceback(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """The real command: it keeps running (no exit, no traceback), not ready; ready when
    the IdP answers; SIGTERM stops it with status 0."""
    sock = bind()
    issuer = base_url(sock)
    http_port = _free_port()
    settings = service_settings(issuer, redis_url, redis_prefix)
    config = tmp_path / "settings.yaml"
    config.write_text(json.dumps(deep_merge(settings, {"http": {"port": http_port}})))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPUP_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(  # noqa: ASYNC220 - a long-running child, read after it ends
        [sys.executable, "-m", "authz.cli", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    readyz = f"http://127.0.0.1:{http_port}/readyz"
    try:
        await async_wait_until(lambda: _status(readyz, 503), "not ready", timeout_s=30)
        assert proc.poll() is None
        async with running(idp_config(issuer), sock):
            await async_wait_until(lambda: _status(readyz, 200), "ready", timeout_s=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    lines = [json.loads(x) for x in stderr.splitlines() if x.startswith("{")]
    assert any(x["msg"].startswith("the identity provider is not reachable") for x in lines)
    assert any(x["msg"].startswith("the identity provider answered") for x in lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_push_step_up_routes_say_the_idp_is_not_there_yet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before the IdP's discovery document is in, /_stepup/ciba exists and refuses with
    idp-unavailable, a reference and its log line; switched off, it does not exist."""
    caplog.set_level(logging.INFO)
    app = web.Application()
    CibaSlot("/_stepup", enabled=True).add_routes(app)
    CibaSlot("/_off", enabled=False).add_routes(app)
    async with TestClient(TestServer(app)) as client:
        for resp in (
            await client.post("/_stepup/ciba", json={}),
            await client.get("/_stepup/ciba/some-id"),
        ):
            doc = await resp.json()
            assert resp.status == 503 and doc["reason"] == "idp-unavailable", doc
            (line,) = [
                x
                for x in json_lines(caplog, "push step-up refused")
                if x["decision_id"] == doc["reference"]
            ]
            assert line["reason"] == "idp-unavailable"
        assert (await client.post("/_off/ciba", json={})).status == 404
