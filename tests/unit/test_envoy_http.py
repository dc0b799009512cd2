"""Envoy's HTTP ext_authz protocol: parsing, attributes, answers equal to the gRPC mode's,
and the asyncio server's keep-alive, pipelining, limits and fail-closed paths."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import MappingProxyType

import pytest
from envoy.service.auth.v3 import external_auth_pb2

from authz.check.authorizer import Authorizer
from authz.check.http_server import HttpAuthzServer, _Unframeable, parse_head
from authz.check.request import PEER_HEADER, attributes_from_check, attributes_from_http
from authz.check.response import (
    METADATA_HEADERS,
    REMOVE_HEADER,
    HttpResponseBuilder,
    ResponseBuilder,
)
from authz.config.policy_file import PolicyHolder
from authz.config.settings import HttpAuthzSettings
from authz.core.attributes import RequestAttributes
from authz.core.decision import Decision, Outcome
from authz.core.policy import load_policy
from authz.core.reasons import Reason
from authz.core.session import Evidence, Grant, Identity
from authz.errors import RequestError
from authz.ops.metrics import Metrics
from authz.render import render_envoy
from authz.store.memory import MemorySessionStore
from tests.builders import FakeClock, FakeTokens, async_wait_until, check_request, identity

NOW = 1_800_000_000
BASE = {"host": "trading.example.com", PEER_HEADER: "10.1.2.3"}


# -- parsing -------------------------------------------------------------------------------


def test_parse_head_reads_method_target_headers() -> None:
    head = (
        "GET /check/a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        "X-Stepup-User:  mallory \r\nAccept:\t*/*"
    )
    method, target, headers, keep_alive = parse_head(head, 10)
    assert (method, target, keep_alive) == ("GET", "/check/a?b=1", True)
    assert headers == {
        "host": "x",
        "content-length": "0",
        "x-stepup-user": "mallory",
        "accept": "*/*",
    }


@pytest.mark.parametrize(
    ("version", "connection", "keep"),
    [
        ("HTTP/1.1", None, True),
        ("HTTP/1.1", "close", False),
        ("HTTP/1.0", None, False),
        ("HTTP/1.0", "keep-alive", True),
    ],
)
def test_parse_head_keep_alive(version: str, connection: str | None, keep: bool) -> None:
    head = f"GET / {version}\r\nhost: x" + (f"\r\nconnection: {connection}" if connection else "")
    assert parse_head(head, 10)[3] is keep


@pytest.mark.parametrize(
    "head",
    [
        "GET /a HTTP/2.0\r\nhost: x",  # unknown version
        "GET  /a HTTP/1.1\r\nhost: x",  # two spaces
        "GET /a HTTP/1.1\r\nhost : x",  # whitespace before the colon (smuggling)
        "GET /a HTTP/1.1\r\nhost: x\r\n folded",  # obs-fold
        "GET /a HTTP/1.1\r\nhost: x\r\nnocolon",
        "GET /a HTTP/1.1\r\nhost: x\x00y",  # NUL in a value
        "GET /a HTTP/1.1\r\nhost: x\r\nhost: y",  # repeated header
        "GET /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5",  # a body
        "GET /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked",
        "GET /a HTTP/1.1\r\n" + "\r\n".join(f"h{i}: v" for i in range(11)),  # too many headers
    ],
)
def test_parse_head_refuses(head: str) -> None:
    with pytest.raises(_Unframeable):
        parse_head(head, 10)


# -- attributes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "/accounts/1",
        "/accounts/1?x=1&y=2",
        "//accounts///1",
        "/public/../accounts/1",
        "/%61ccounts/1",
        "/a%2a",
        "/accounts/",
        "/..",
    ],
)
def test_attributes_equal_the_grpc_modes(raw: str) -> None:
    headers = {
        **BASE,
        "host": "Trading.Example.com:8443",
        "x-request-id": "r1",
        "authorization": "Bearer t",
        "x-forwarded-proto": "https",
    }
    http = attributes_from_http("GET", "/check" + raw, headers, path_prefix="/check")
    # What Envoy's gRPC mode sends for the same request: host and peer as fields.
    req = check_request(raw, headers, host=headers["host"], scheme="", ip=headers[PEER_HEADER])
    grpc = attributes_from_check(req)
    for name in ("method", "host", "path", "query", "source_ip", "request_id"):
        assert getattr(http, name) == getattr(grpc, name), name
    assert http.host == "trading.example.com"
    assert http.scheme == "https"
    assert dict(http.headers) == headers
    assert dict(http.context_extensions) == {}


def test_level_segment_is_the_context_level() -> None:
    a = attributes_from_http("POST", "/check@high/wires/1", BASE, path_prefix="/check")
    assert a.path == "/wires/1" and dict(a.context_extensions) == {"stepup_level": "high"}


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("/other/accounts/1", "bad-request"),  # outside the prefix
        ("/checkaccounts", "bad-path"),  # prefix then not '/' nor '@'
        ("/check@high", "bad-request"),  # a level and no path
        ("/check@hi gh/x", "bad-request"),
        ("/check@/x", "bad-request"),
        ("/check/accounts%2F1", "bad-path"),  # refused like the gRPC mode
        ("/check*", "bad-path"),
    ],
)
def test_attributes_refuse(target: str, reason: str) -> None:
    with pytest.raises(RequestError) as info:
        attributes_from_http("GET", target, BASE, path_prefix="/check")
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "headers",
    [
        {"host": "x"},  # no peer header: Envoy config is wrong
        {"host": "x", PEER_HEADER: "not-an-ip"},
        {PEER_HEADER: "10.0.0.1"},  # no host
    ],
)
def test_attributes_need_host_and_peer(headers: dict[str, str]) -> None:
    with pytest.raises(RequestError):
        attributes_from_http("GET", "/check/", headers, path_prefix="/check")


# -- answers equal the gRPC mode's ---------------------------------------------------------


def _envoy_lists() -> dict[str, set[str] | str]:
    """The header lists of ``render envoy --mode http``, so the comparison follows the real
    config."""
    policy = load_policy({"levels": {"standard": {}}, "default_level": "standard"})
    doc = render_envoy(policy, mode="http", hosts=["trading.example.com"])
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    authz = hcm["typed_config"]["http_filters"][0]["typed_config"]
    resp = authz["http_service"]["authorization_response"]

    def names(key: str) -> set[str]:
        return {p["exact"] for p in resp[key]["patterns"]}

    client = names("allowed_client_headers") | {"location", "www-authenticate"}
    return {
        "upstream": names("allowed_upstream_headers"),
        "client": client,
        "metadata": names("dynamic_metadata_from_headers"),
    }


LISTS = _envoy_lists()
LEVELS = load_policy(
    {
        "levels": {
            "public": {"public": True},
            "standard": {},
            "elevated": {"acr": ["mfa", "phr"], "max_age": 900},
        },
        "default_level": "standard",
    }
).by_name
ALICE = Identity("https://idp", "alice", "sid-1", Evidence("pwd", ("pwd",), NOW - 60), NOW + 600)
MFA = Evidence("mfa", ("pwd", "otp"), NOW - 30)


def _attrs(method: str = "GET", **headers: str) -> RequestAttributes:
    return RequestAttributes(
        method=method,
        scheme="http",
        host="trading.example.com",
        path="/accounts/1",
        query="x=1",
        headers=MappingProxyType({**BASE, **headers}),
        source_ip=ipaddress.ip_address("10.1.2.3"),
    )


HTML = "text/html,application/xhtml+xml"
CASES: list[tuple[str, Decision, RequestAttributes | None]] = [
    (
        "allow",
        Decision(
            Outcome.ALLOW,
            "allowed",
            level=LEVELS["elevated"],
            identity=ALICE,
            evidence=MFA,
            grant=Grant("elevated", MFA, NOW + 900, NOW - 30),
        ),
        _attrs(**{"x-stepup-user": "mallory", "x-stepup-extra": "forged"}),
    ),
    (
        "allow-public",
        Decision(Outcome.ALLOW, "public", level=LEVELS["public"]),
        _attrs(**{"x-stepup-user": "mallory"}),
    ),
    (
        "allow-token",
        Decision(
            Outcome.ALLOW,
            "allowed",
            level=LEVELS["standard"],
            identity=ALICE,
            evidence=ALICE.evidence,
        ),
        _attrs(),
    ),
    ("login-api", Decision(Outcome.LOGIN, "no-credentials", level=LEVELS["elevated"]), _attrs()),
    (
        "login-browser",
        Decision(Outcome.LOGIN, "no-credentials", level=LEVELS["elevated"]),
        _attrs(accept=HTML),
    ),
    (
        "login-bad-token",
        Decision(Outcome.LOGIN, "token-expired", level=LEVELS["elevated"]),
        _attrs(),
    ),
    (
        "step-up-api",
        Decision(Outcome.STEP_UP, "acr-insufficient", level=LEVELS["elevated"], identity=ALICE),
        _attrs(),
    ),
    (
        "step-up-browser",
        Decision(Outcome.STEP_UP, "auth-too-old", level=LEVELS["elevated"], identity=ALICE),
        _attrs(accept=HTML),
    ),
    (
        "step-up-browser-post",
        Decision(Outcome.STEP_UP, "acr-insufficient", level=LEVELS["elevated"], identity=ALICE),
        _attrs("POST", accept=HTML),
    ),
    (
        "step-up-grpc",
        Decision(Outcome.STEP_UP, "acr-insufficient", level=LEVELS["elevated"]),
        _attrs("POST", accept=HTML, **{"content-type": "application/grpc"}),
    ),
    (
        "deny",
        Decision(
            Outcome.DENY, Reason.RULE_DENIED, level=LEVELS["standard"], rule_reason="ip-blocked"
        ),
        _attrs(),
    ),
    ("deny-unread", Decision(Outcome.DENY, "bad-path"), None),
    (
        "error",
        Decision(Outcome.ERROR, "session-store-unavailable", level=LEVELS["elevated"]),
        _attrs(),
    ),
]


def _metadata(resp: external_auth_pb2.CheckResponse) -> dict[str, str]:
    fields = resp.dynamic_metadata.fields
    return {k: fields[k].string_value for k in ("decision_id", "outcome", "reason", "level")}


@pytest.mark.parametrize("error_status", [403, 503])
@pytest.mark.parametrize(("name", "decision", "attrs"), CASES, ids=[c[0] for c in CASES])
def test_answers_equal_the_grpc_modes(
    name: str, decision: Decision, attrs: RequestAttributes | None, error_status: int
) -> None:
    grpc = ResponseBuilder(error_status=error_status).build(decision, attrs, "d-1")
    answer = HttpResponseBuilder(error_status=error_status).build(decision, attrs, "d-1")
    sent = dict(answer.headers)
    assert len(sent) == len(answer.headers)  # no header twice
    # What Envoy takes into dynamic metadata equals the gRPC mode's metadata.
    meta = {k: v for k, v in sent.items() if k in LISTS["metadata"]}
    assert set(meta) <= set(METADATA_HEADERS)
    assert _metadata(grpc) == {
        "decision_id": meta["x-stepup-decision-id"],
        "outcome": meta["x-stepup-outcome"],
        "reason": meta["x-stepup-reason"],
        "level": meta["x-stepup-level"],
    }
    if grpc.HasField("ok_response"):
        assert answer.status == 200
        upstream = {k: v for k, v in sent.items() if k in LISTS["upstream"]}
        assert upstream == {h.header.key: h.header.value for h in grpc.ok_response.headers}
        removed = [h.strip() for h in sent.get(REMOVE_HEADER, "").split(",") if h.strip()]
        assert removed == list(grpc.ok_response.headers_to_remove)
        assert answer.body == b""
    else:
        denied = grpc.denied_response
        assert answer.status == denied.status.code
        client = {k: v for k, v in sent.items() if k in LISTS["client"]}
        assert client == {h.header.key: h.header.value for h in denied.headers}
        assert answer.body == denied.body.encode()
        assert answer.status != 200
    # The wire form carries exactly these headers, a content-length and the body.
    head, _, body = answer.wire.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {answer.status} ")
    assert lines[1:] == [f"{k}: {v}" for k, v in answer.headers] + [
        f"content-length: {len(answer.body)}"
    ]
    assert body == answer.body


def test_exact_rfc9470_challenge_line() -> None:
    decision = CASES[6][1]
    wire = HttpResponseBuilder().build(decision, _attrs(), "d-1").wire
    assert wire.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert (
        b'\r\nwww-authenticate: Bearer realm="stepup-authz", '
        b'error="insufficient_user_authentication", '
        b'error_description="A different authentication level is required", '
        b'acr_values="mfa phr", max_age=900\r\n'
    ) in wire


def test_header_injection_is_refused() -> None:
    evil = Identity("https://idp", "alice\r\nx-stepup-level: high", "s", MFA, NOW + 60)
    with pytest.raises(ValueError, match="control character"):
        HttpResponseBuilder().build(
            Decision(Outcome.ALLOW, "allowed", level=LEVELS["standard"], identity=evil),
            _attrs(),
            "d",
        )


# -- the server ----------------------------------------------------------------------------

POLICY = """\
levels:
  public: {public: true}
  standard: {}
  elevated: {acr: [mfa, phr], max_age: 900}
  high: {acr: [phr], max_age: 300}
routes:
  - {path: /, level: public}
  - {path_prefix: /accounts/, level: elevated}
  - {path_prefix: /slow/, level: standard}
default_level: standard
"""


class HeldTokens(FakeTokens):
    """Two bearer tokens, "mfa" and "pwd". With ``hold`` set, a verification waits
    (``entered`` set) until ``release`` is set: a Check held in flight for as long as the
    test needs, instead of a delay that may or may not be long enough."""

    def __init__(self) -> None:
        super().__init__()
        for acr, amr in (("mfa", ("otp",)), ("pwd", ("pwd",))):
            self.access[acr] = identity(
                issuer="https://idp",
                acr=acr,
                amr=amr,
                auth_time=NOW - 5,
                expires_at=NOW + 600,
                issued_at=NOW - 5,
            )
        self.hold = False
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def verify_access_token(self, token: str, now: int) -> Identity:
        if self.hold:
            self.entered.set()
            await self.release.wait()
        return await super().verify_access_token(token, now)


class Mono:
    """The listener's clock, moved by the test: timers fire when it says, not the wall."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_server(
    tmp_path: Path, clock: Mono | None = None, **limits: float | int
) -> HttpAuthzServer:
    (tmp_path / "policy.yaml").write_text(POLICY)
    authorizer = Authorizer(
        policy=PolicyHolder(tmp_path / "policy.yaml"),
        tokens=HeldTokens(),
        store=MemorySessionStore(FakeClock(NOW)),
        metrics=Metrics(),
        token_cookie="stepup_token",
        leeway=0,
        clock=FakeClock(NOW),
    )
    settings = HttpAuthzSettings.model_validate(
        {
            "enabled": True,
            "port": 0,
            "max_header_bytes": 4096,
            "max_headers": 20,
            "request_timeout_s": 0.5,
            "header_timeout_s": 0.4,
            "idle_timeout_s": 0.6,
            "max_connections": 4,
            **limits,
        }
    )
    return HttpAuthzServer(authorizer, HttpResponseBuilder(), settings, clock=clock)


@pytest.fixture
def mono() -> Mono:
    return Mono()


@pytest.fixture
async def server(tmp_path: Path, mono: Mono) -> AsyncIterator[HttpAuthzServer]:
    srv = make_server(tmp_path, mono)
    await srv.start()
    yield srv
    await srv.stop(1.0)


def req(
    path: str = "/accounts/1",
    cred: str | None = "mfa",
    *,
    method: str = "GET",
    extra: str = "",
    prefix: str = "/check",
) -> bytes:
    auth = f"authorization: Bearer {cred}\r\n" if cred else ""
    return (
        f"{method} {prefix}{path} HTTP/1.1\r\nhost: trading.example.com\r\n"
        f"content-length: 0\r\n{auth}{PEER_HEADER}: 10.1.2.3\r\n{extra}\r\n"
    ).encode()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def connect(
    srv: HttpAuthzServer, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from ``source`` (any 127/8 address: a second client on loopback)."""
    return await asyncio.open_connection("127.0.0.1", srv.port, local_addr=(source, 0))


async def test_keep_alive_and_pipelining_answer_in_order(server: HttpAuthzServer) -> None:
    r, w = await connect(server)
    w.write(req("/accounts/1", "mfa"))
    assert (await read_answer(r))[0] == 200
    # three pipelined requests in one write, then one split across writes
    w.write(req("/accounts/1", "pwd") + req("/accounts/1", None) + req("/", None))
    statuses = [(await read_answer(r))[:2] for _ in range(3)]
    assert [s for s, _ in statuses] == [401, 401, 200]
    assert statuses[0][1]["x-stepup-reason"] == "acr-insufficient"
    assert statuses[1][1]["x-stepup-reason"] == "no-credentials"
    data = req("/accounts/2", "mfa")
    w.write(data[:7])
    await async_wait_until(
        lambda: any(c.buf == data[:7] for c in server.conns), "the server to read a part"
    )
    w.write(data[7:])
    status, headers, _ = await read_answer(r)
    assert status == 200 and headers["x-stepup-user"] == "alice"
    w.close()


async def test_bad_path_denies_and_keeps_the_connection(server: HttpAuthzServer) -> None:
    r, w = await connect(server)
    w.write(req("/accounts%2F1"))
    status, headers, body = await read_answer(r)
    assert status == 403 and headers["x-stepup-reason"] == "bad-path"
    assert "connection" not in headers
    assert json.loads(body)["reason"] == "bad-path"
    w.write(req("/accounts/1"))
    assert (await read_answer(r))[0] == 200
    w.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /check/ HTTP/1.1\r\nhost : x\r\n\r\n",
        b"POST /check/ HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nbody",
    ],
)
async def test_unreadable_stream_gets_403_and_close(
    server: HttpAuthzServer, payload: bytes
) -> None:
    r, w = await connect(server)
    w.write(payload + req())  # a valid request after it must not be answered
    status, headers, _ = await read_answer(r)
    assert status == 403 and headers["connection"] == "close"
    assert headers["x-stepup-reason"] == "bad-request"
    assert await asyncio.wait_for(r.read(), 5) == b""  # closed
    w.close()


async def test_head_timeout_answers_403_and_closes(server: HttpAuthzServer, mono: Mono) -> None:
    r, w = await connect(server)
    w.write(b"GET /check/ HTTP/1.1\r\nhost: x\r\n")  # never finished
    await async_wait_until(lambda: any(c.buf for c in server.conns), "the server to read it")
    server.expire_due()
    assert not r.at_eof()  # not yet due
    mono.advance(0.4)
    server.expire_due()
    status, headers, _ = await read_answer(r)
    assert status == 403 and headers["x-stepup-reason"] == "deadline-exceeded"
    assert await asyncio.wait_for(r.read(), 5) == b""
    w.close()


async def test_slow_check_is_a_deadline_deny(server: HttpAuthzServer, mono: Mono) -> None:
    """A Check held past the listener's request timer: only the timer can answer."""
    tokens = server.authorizer.tokens
    assert isinstance(tokens, HeldTokens)
    tokens.hold = True  # never released
    r, w = await connect(server)
    w.write(req("/accounts/1", "mfa"))
    await asyncio.wait_for(tokens.entered.wait(), 5)
    mono.advance(0.5)
    server.expire_due()
    status, headers, _ = await read_answer(r)
    assert status == 403 and headers["x-stepup-reason"] == "deadline-exceeded"
    assert headers["connection"] == "close"
    w.close()


async def test_idle_keep_alive_connection_is_closed(server: HttpAuthzServer, mono: Mono) -> None:
    r, w = await connect(server)
    w.write(req("/", None))
    assert (await read_answer(r))[0] == 200
    mono.advance(0.5)  # past the head timeout, not the idle one: kept
    server.expire_due()
    assert len(server.conns) == 1
    mono.advance(0.1)
    server.expire_due()
    assert await asyncio.wait_for(r.read(), 5) == b""
    w.close()


async def test_a_connection_that_sends_nothing_gets_the_head_timeout(
    server: HttpAuthzServer, mono: Mono
) -> None:
    """A new connection must send its head within header_timeout_s, not idle_timeout_s."""
    r, w = await connect(server)
    await async_wait_until(lambda: len(server.conns) == 1, "the server to accept it")
    mono.advance(0.4)
    server.expire_due()
    assert await asyncio.wait_for(r.read(), 5) == b""
    w.close()


async def test_connection_cap_answers_403_when_every_connection_is_busy(
    server: HttpAuthzServer,
) -> None:
    """Only connections with a check in flight hold the cap: then a new one is refused."""
    tokens = server.authorizer.tokens
    assert isinstance(tokens, HeldTokens)
    tokens.hold = True
    conns = [await connect(server) for _ in range(4)]
    for _, w in conns:
        w.write(req("/accounts/1", "mfa"))
    await async_wait_until(
        lambda: len(server.conns) == 4 and all(c.task for c in server.conns), "4 checks in flight"
    )
    r, w = await connect(server)
    status, headers, _ = await read_answer(r)
    assert status == 403 and headers["connection"] == "close"
    tokens.release.set()
    assert [(await read_answer(cr))[0] for cr, _ in conns] == [200] * 4
    for _, cw in [*conns, (r, w)]:
        cw.close()


# -- listener hardening: floods from one source, pipelining, header size ------------------

ATTACKER = "127.0.0.2"


async def test_idle_sockets_cannot_fill_the_cap(server: HttpAuthzServer) -> None:
    """Eight idle sockets against a cap of four: Envoy's connections are still admitted
    (the longest-idle socket is closed for each) and every check is answered."""
    idle = [await connect(server, ATTACKER) for _ in range(8)]
    await async_wait_until(lambda: sum(r.at_eof() for r, _ in idle) == 4, "4 sockets closed")
    assert len(server.conns) == 4
    envoy = [await connect(server) for _ in range(3)]
    for _ in range(2):
        for r, w in envoy:
            w.write(req("/accounts/1", "mfa"))
            assert (await read_answer(r))[0] == 200
    assert sum(r.at_eof() for r, _ in idle) == 7  # one idle socket left in the room
    for _, w in [*idle, *envoy]:
        w.close()


async def test_idle_socket_flood_from_one_source_leaves_others_served(tmp_path: Path) -> None:
    srv = make_server(tmp_path, Mono(), max_connections=8, max_connections_per_source=4)
    await srv.start()
    try:
        flood = [await connect(srv, ATTACKER) for _ in range(20)]
        await async_wait_until(
            lambda: sum(r.at_eof() for r, _ in flood) == 16, "all but 4 of the flood closed"
        )
        assert len(srv.by_source[ATTACKER]) == 4  # the source's limit, not the cap
        others = [await connect(srv, f"127.0.0.{n}") for n in (1, 3, 4, 5)]
        for _, w in others:
            w.write(req("/accounts/1", "mfa"))
        assert [(await read_answer(r))[0] for r, _ in others] == [200] * 4
        for _, w in [*flood, *others]:
            w.close()
    finally:
        await srv.stop(1.0)


async def test_slowloris_from_one_source_leaves_others_served(tmp_path: Path) -> None:
    """Heads trickled a byte at a time: the source holds at most its limit, others are
    served meanwhile, and the trickle does not extend the head's deadline."""
    mono = Mono()
    srv = make_server(tmp_path, mono, max_connections=8, max_connections_per_source=4)
    await srv.start()
    try:
        slow = [await connect(srv, ATTACKER) for _ in range(6)]
        for _, w in slow:
            w.write(b"GET /check/accounts/1 HTTP/1.1\r\nhost: trading.example.com\r\n")
        await async_wait_until(
            lambda: (
                sum(r.at_eof() for r, _ in slow) == 2
                and sum(len(c.buf) > 0 for c in srv.by_source.get(ATTACKER, ())) == 4
            ),
            "the source held to 4 connections, each with part of a head",
        )
        envoy = [await connect(srv, src) for src in ("127.0.0.1", "127.0.0.3", "127.0.0.4")]
        for _, w in envoy:
            w.write(req("/accounts/1", "mfa"))
        assert [(await read_answer(r))[0] for r, _ in envoy] == [200] * 3
        live = [(r, w) for r, w in slow if not r.at_eof()]
        held = sum(len(c.buf) for c in srv.by_source[ATTACKER])
        mono.advance(0.3)
        for _, w in live:
            w.write(b"x")  # one more byte each, before the deadline
        await async_wait_until(
            lambda: sum(len(c.buf) for c in srv.by_source[ATTACKER]) == held + len(live),
            "the trickled bytes read",
        )
        srv.expire_due()
        assert len(srv.by_source[ATTACKER]) == 4
        mono.advance(0.1)  # 0.4 s since each head's first byte
        srv.expire_due()
        for r, _ in live:
            status, headers, _ = await read_answer(r)
            assert status == 403 and headers["x-stepup-reason"] == "deadline-exceeded"
        assert ATTACKER not in srv.by_source
        for r, w in envoy:  # Envoy's keep-alive connections are still there, and served
            w.write(req("/", None))
            assert (await read_answer(r))[0] == 200
        for _, w in [*slow, *envoy]:
            w.close()
    finally:
        await srv.stop(1.0)


async def test_a_thousand_pipelined_requests_are_answered_in_order(
    server: HttpAuthzServer,
) -> None:
    """600 requests answered without a check (bad paths: the stack-growing case) then 400
    alternating with real checks, in one write: every answer, in order, on one connection."""
    kinds = ["bad"] * 600 + [("public", "pwd")[i % 2] for i in range(400)]
    wire = {
        "bad": req("/accounts%2F1"),
        "public": req("/", None),
        "pwd": req("/accounts/1", "pwd"),
    }
    expected = {"bad": (403, "bad-path"), "public": (200, "public"), "pwd": (401, None)}
    r, w = await connect(server)
    w.write(b"".join(wire[k] for k in kinds))
    answers = []
    for _ in kinds:
        status, headers, _ = await read_answer(r)
        answers.append((status, headers.get("x-stepup-reason")))
    for kind, (status, reason) in zip(kinds, answers, strict=True):
        want_status, want_reason = expected[kind]
        assert status == want_status
        if kind == "bad":
            assert reason == want_reason
    w.write(req("/accounts/1", "mfa"))  # the connection is still good
    assert (await read_answer(r))[0] == 200
    w.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"GET /check/ HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 5000 + b"\r\n\r\n",
        b"GET /check/ HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 5000,  # no end in sight
        b"GET /check/ HTTP/1.1\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(21)) + b"\r\n",
    ],
    ids=["too-large", "too-large-unfinished", "too-many"],
)
async def test_oversize_headers_get_431_and_close(server: HttpAuthzServer, payload: bytes) -> None:
    r, w = await connect(server)
    w.write(payload + req())  # a valid request after it must not be answered
    status, headers, body = await read_answer(r)
    assert status == 431 and headers["connection"] == "close"
    assert headers["x-stepup-reason"] == "bad-request" == json.loads(body)["reason"]
    assert await asyncio.wait_for(r.read(), 5) == b""
    w.close()


async def test_store_down_is_403_session_store_unavailable(server: HttpAuthzServer) -> None:
    store = server.authorizer.store
    assert isinstance(store, MemorySessionStore)
    store.fail = True
    r, w = await connect(server)
    w.write(req("/accounts/1", "pwd"))
    status, headers, _ = await read_answer(r)
    assert status == 403 and headers["x-stepup-reason"] == "session-store-unavailable"
    w.close()


async def test_stop_drains_in_flight_and_closes_idle(server: HttpAuthzServer) -> None:
    tokens = server.authorizer.tokens
    assert isinstance(tokens, HeldTokens)
    idle_r, idle_w = await connect(server)
    idle_w.write(req("/", None))
    assert (await read_answer(idle_r))[0] == 200
    tokens.hold = True
    r, w = await connect(server)
    w.write(req("/accounts/1", "mfa"))
    await asyncio.wait_for(tokens.entered.wait(), 5)  # the Check is in flight
    stopping = asyncio.create_task(server.stop(2.0))
    assert await asyncio.wait_for(idle_r.read(), 5) == b""  # idle: closed at once
    assert not stopping.done()  # ...while the in-flight Check holds the stop
    tokens.release.set()
    status, headers, _ = await read_answer(r)  # in flight: answered, then closed
    assert status == 200 and headers["connection"] == "close"
    await asyncio.wait_for(stopping, 3)
    assert not server.conns
    with pytest.raises(OSError):
        await connect(server)
    for cw in (idle_w, w):
        cw.close()


def test_on_uvloop(tmp_path: Path) -> None:
    """The service runs on uvloop (its transports are not asyncio.Transport subclasses)."""
    import uvloop

    async def scenario() -> None:
        srv = make_server(tmp_path)
        await srv.start()
        r, w = await connect(srv)
        w.write(req("/accounts/1", "mfa") + req("/accounts/1", None))
        assert [(await read_answer(r))[0] for _ in range(2)] == [200, 401]
        w.write(b"BAD\r\n\r\n")
        assert (await read_answer(r))[0] == 403
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        await srv.stop(1.0)

    uvloop.run(scenario())
