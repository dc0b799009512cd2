"""Overload: a Check whose Envoy deadline has passed is refused as ``overloaded`` before any
Redis call, in both modes; a Check still within its deadline is decided as before. The
deadline is read on the authorizer's injected monotonic clock (no wall-clock waiting)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from authz.check.authorizer import Authorizer
from authz.check.grpc_server import AuthorizationServicer
from authz.check.http_server import HttpAuthzServer, expected_timeout_s
from authz.check.request import PEER_HEADER, attributes_from_check
from authz.check.response import HttpResponseBuilder, ResponseBuilder
from authz.config.policy_file import PolicyHolder
from authz.config.settings import HttpAuthzSettings
from authz.core.decision import Outcome
from authz.core.reasons import Reason
from authz.core.session import Identity
from authz.ops.metrics import Metrics
from authz.store.memory import MemorySessionStore
from tests.builders import NOW, FakeClock, FakeTokens, check_request, identity

POLICY = """\
levels:
  public: {public: true}
  standard: {}
routes:
  - {path: /, level: public}
default_level: standard
"""


class Tokens(FakeTokens):
    """One bearer token, "t". ``during`` runs inside the verification (to move the clock
    while a Check is between its token check and its session read)."""

    def __init__(self) -> None:
        super().__init__()
        self.access["t"] = identity(issuer="https://idp", expires_at=NOW + 600)
        self.during: Any = None
        self.calls = 0

    async def verify_access_token(self, token: str, now: int) -> Identity:
        self.calls += 1
        if self.during is not None:
            self.during()
        return await super().verify_access_token(token, now)


class Env:
    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "policy.yaml").write_text(POLICY)
        self.mono = FakeClock(1000.0)
        self.store = MemorySessionStore(FakeClock(NOW))
        self.tokens = Tokens()
        self.metrics = Metrics()
        self.authorizer = Authorizer(
            policy=PolicyHolder(tmp_path / "policy.yaml"),
            tokens=self.tokens,
            store=self.store,
            metrics=self.metrics,
            token_cookie="stepup_token",
            leeway=0,
            clock=FakeClock(NOW),
            monotonic=self.mono,
        )

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def attrs(path: str = "/accounts/1") -> Any:
    return attributes_from_check(check_request(path, {"authorization": "Bearer t"}))


async def test_expired_deadline_is_overloaded_before_any_redis_call(env: Env) -> None:
    deadline = env.authorizer.deadline_in(0.2)
    env.mono.advance(0.2)  # queued until Envoy's deadline
    result = await env.authorizer.check(attrs(), deadline)
    assert result.decision.outcome is Outcome.ERROR
    assert result.decision.reason is Reason.OVERLOADED
    assert env.store.calls == 0 and env.tokens.calls == 0
    assert env.sample("stepup_authz_checks_shed_total") == 1
    assert env.sample("stepup_authz_fail_closed_total", cause="overloaded") == 1


async def test_deadline_not_reached_is_decided(env: Env) -> None:
    deadline = env.authorizer.deadline_in(0.2)
    env.mono.advance(0.199)
    result = await env.authorizer.check(attrs(), deadline)
    assert result.decision.outcome is Outcome.ALLOW
    assert env.store.calls >= 1
    assert env.sample("stepup_authz_checks_shed_total") == 0


async def test_no_deadline_is_never_shed(env: Env) -> None:
    env.mono.advance(10_000)
    result = await env.authorizer.check(attrs(), None)
    assert result.decision.outcome is Outcome.ALLOW


async def test_deadline_passing_during_the_token_check_sheds_before_the_read(env: Env) -> None:
    deadline = env.authorizer.deadline_in(0.05)
    env.tokens.during = lambda: env.mono.advance(0.06)  # e.g. a JWKS fetch, a stall
    result = await env.authorizer.check(attrs(), deadline)
    assert result.decision.reason is Reason.OVERLOADED
    assert result.decision.identity is not None  # the log names whose Check was shed
    assert env.tokens.calls == 1 and env.store.calls == 0


async def test_public_route_shed_too(env: Env) -> None:
    # Past its deadline nothing is decided: the answer would reach nobody.
    deadline = env.authorizer.deadline_in(0.0)
    result = await env.authorizer.check(attrs("/"), deadline)
    assert result.decision.reason is Reason.OVERLOADED


# -- gRPC: the call's time remaining ------------------------------------------------------


class Context:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def _grpc_reason(resp: Any) -> str:
    return next(
        h.header.value for h in resp.denied_response.headers if h.header.key == "x-stepup-reason"
    )


async def test_grpc_call_without_time_left_is_overloaded(env: Env) -> None:
    servicer = AuthorizationServicer(env.authorizer, ResponseBuilder())
    req = check_request("/accounts/1", {"authorization": "Bearer t"})
    resp = await servicer.Check(req, Context(-0.01))  # its deadline passed while queued
    assert _grpc_reason(resp) == Reason.OVERLOADED
    assert env.store.calls == 0
    resp = await servicer.Check(req, Context(0.2))
    assert resp.HasField("ok_response")
    resp = await servicer.Check(req, Context(None))  # a call without a deadline
    assert resp.HasField("ok_response")


# -- HTTP: x-envoy-expected-rq-timeout-ms, from when the request was read -----------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("250", 0.25), ("0", 0.0), (None, None), ("", None), ("-5", None), ("1e3", None),
     ("2.5", None), (" 250", None), ("9999999999", None)],
)  # fmt: skip
def test_expected_timeout_header(value: str | None, seconds: float | None) -> None:
    headers = {} if value is None else {"x-envoy-expected-rq-timeout-ms": value}
    assert expected_timeout_s(headers) == seconds


@pytest.fixture
async def http(env: Env) -> AsyncIterator[HttpAuthzServer]:
    settings = HttpAuthzSettings(enabled=True, port=0, request_timeout_s=5, idle_timeout_s=5)
    srv = HttpAuthzServer(env.authorizer, HttpResponseBuilder(), settings)
    await srv.start()
    yield srv
    await srv.stop(1.0)


def _http_req(timeout_ms: str | None) -> bytes:
    extra = f"x-envoy-expected-rq-timeout-ms: {timeout_ms}\r\n" if timeout_ms else ""
    return (
        "GET /check/accounts/1 HTTP/1.1\r\nhost: app.test\r\ncontent-length: 0\r\n"
        f"authorization: Bearer t\r\n{PEER_HEADER}: 10.1.2.3\r\n{extra}\r\n"
    ).encode()


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split(" ")[1]), headers


async def test_http_check_queued_past_its_timeout_is_overloaded(
    env: Env, http: HttpAuthzServer
) -> None:
    # The clock moves between reading the request and running its Check: the Check
    # waited in the loop's queue past Envoy's expected timeout.
    created: list[asyncio.Task[Any]] = []
    loop = asyncio.get_running_loop()
    real_create_task = loop.create_task

    def create_task(coro: Any, **kw: Any) -> asyncio.Task[Any]:
        env.mono.advance(0.3)
        task = real_create_task(coro, **kw)
        created.append(task)
        return task

    r, w = await asyncio.open_connection("127.0.0.1", http.port)
    try:
        loop.create_task = create_task  # type: ignore[method-assign]
        w.write(_http_req("250"))
        status, headers = await _answer(r)
        assert created  # the clock did move between read and Check
        assert status == 403 and headers["x-stepup-reason"] == "overloaded"
        assert env.store.calls == 0
        w.write(_http_req("350"))  # the same wait, a longer timeout: decided
        status, headers = await _answer(r)
        assert status == 200, headers
        w.write(_http_req(None))  # no header: no deadline
        status, _ = await _answer(r)
        assert status == 200
    finally:
        del loop.create_task
        w.close()
    assert env.sample("stepup_authz_checks_shed_total") == 1
