"""FastRedis against a scripted in-process server speaking raw RESP: reply parsing through
hiredis (split and coalesced packets, nil, nested arrays, errors, RESP3 booleans and push
messages), FIFO matching of pipelined calls, a late reply after a deadline, reconnect after
the server drops the connection, the stale-connection guard, the connect handshake, URLs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from redis.exceptions import AuthenticationError, ConnectionError, NoScriptError, ResponseError

from authz.config.settings import RedisSettings
from authz.errors import ConfigError
from authz.store.fastredis import FastRedis, make_fast_redis, parse_url
from tests.builders import FakeClock

Responder = Callable[[list[bytes]], bytes | None]


def _parse_commands(buf: bytearray) -> list[list[bytes]]:
    """Complete RESP arrays of bulk strings at the head of ``buf`` (consumed)."""
    out = []
    while buf.startswith(b"*"):
        pos = buf.find(b"\r\n")
        if pos < 0:
            break
        n = int(buf[1:pos])
        i, args = pos + 2, []
        for _ in range(n):
            end = buf.find(b"\r\n", i)
            if end < 0:
                return out
            size = int(buf[i + 1 : end])
            if len(buf) < end + 2 + size + 2:
                return out
            args.append(bytes(buf[end + 2 : end + 2 + size]))
            i = end + 2 + size + 2
        del buf[:i]
        out.append(args)
    return out


@dataclass
class FakeServer:
    """Answers each command with ``respond(args)`` (None: no answer, hold it)."""

    respond: Responder
    seen: list[list[bytes]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    server: asyncio.Server | None = None
    held: list[tuple[asyncio.StreamWriter, list[bytes]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set on each command held

    async def wait_held(self, n: int) -> None:
        """Until ``n`` commands are held (unanswered)."""
        async with asyncio.timeout(10):
            while len(self.held) < n:
                self.changed.clear()
                await self.changed.wait()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        buf = bytearray()
        try:
            while data := await reader.read(65536):
                buf += data
                for cmd in _parse_commands(buf):
                    self.seen.append(cmd)
                    reply = self.respond(cmd)
                    if reply is None:
                        self.held.append((writer, cmd))
                        self.changed.set()
                    else:
                        writer.write(reply)
        except OSError:  # the client went away
            pass
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def drop_all(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()


def echo_ok(cmd: list[bytes]) -> bytes | None:
    name = cmd[0].upper()
    if name in (b"CLIENT", b"SELECT", b"AUTH"):
        return b"+OK\r\n"
    if name == b"PING":
        return b"+PONG\r\n"
    if name == b"ECHO":
        return b"$%d\r\n%s\r\n" % (len(cmd[1]), cmd[1])
    return b"-ERR unknown command\r\n"


@pytest.fixture
async def make_server() -> AsyncIterator[Callable[[Responder], asyncio.Future[FakeServer]]]:
    servers: list[FakeServer] = []

    async def make(respond: Responder) -> FakeServer:
        fake = FakeServer(respond)
        fake.server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
        servers.append(fake)
        return fake

    yield make  # type: ignore[misc]
    for s in servers:
        s.drop_all()
        assert s.server is not None
        s.server.close()
        await s.server.wait_closed()


async def test_pipelined_calls_are_matched_in_order(make_server) -> None:  # type: ignore[no-untyped-def]
    fake = await make_server(echo_ok)
    client = FastRedis(port=fake.port, connections=1, client_name=None)
    try:
        values = [f"v{i}".encode() for i in range(200)]
        replies = await asyncio.gather(*(client.execute("ECHO", v) for v in values))
        assert replies == values
        assert client.connects == 1  # all 200 shared one connection
    finally:
        await client.aclose()


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 16])
async def test_replies_split_or_coalesced_in_any_way(make_server, chunk: int) -> None:  # type: ignore[no-untyped-def]
    # One EVALSHA reply of read_check's shape: ints, nil, bulk strings, a nested array.
    body = b"*6\r\n:1\r\n$-1\r\n:-1\r\n$5\r\nhello\r\n*2\r\n:7\r\n$0\r\n\r\n$3\r\n\x00\r\n\r\n"

    async def respond_split(writer: asyncio.StreamWriter, data: bytes) -> None:
        for i in range(0, len(data), chunk):
            writer.write(data[i : i + chunk])
            await writer.drain()
            await asyncio.sleep(0)

    tasks: list[asyncio.Task[None]] = []
    fake: FakeServer

    def respond(cmd: list[bytes]) -> bytes | None:
        if cmd == [b"EVALSHA", b"abc", b"1", b"k", b"b"]:  # both replies, in pieces
            tasks.append(asyncio.ensure_future(respond_split(fake.writers[-1], body * 2)))
            return None
        if cmd[0] == b"EVALSHA":
            return None
        return echo_ok(cmd)

    fake = await make_server(respond)
    client = FastRedis(port=fake.port, connections=1)
    try:
        first = client.evalsha("abc", 1, "k", "a")
        second = client.evalsha("abc", 1, "k", "b")
        got = await asyncio.gather(first, second)
        expected = [1, None, -1, b"hello", [7, b""], b"\x00\r\n"]
        assert got == [expected, expected]
    finally:
        await client.aclose()


async def test_error_replies_raise_redis_py_exceptions(make_server) -> None:  # type: ignore[no-untyped-def]
    def respond(cmd: list[bytes]) -> bytes:
        if cmd[0] == b"EVALSHA":
            return b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
        if cmd[0] == b"EVAL":
            return b"-ERR user_script:1: boom\r\n"
        return echo_ok(cmd)

    fake = await make_server(respond)
    client = FastRedis(port=fake.port, connections=1)
    try:
        with pytest.raises(NoScriptError):
            await client.evalsha("abc", 0)
        with pytest.raises(ResponseError, match="boom"):
            await client.eval("return 1", 0)
        # An error reply answers its own request only: the connection stays in step.
        assert await client.execute("ECHO", b"still") == b"still"
        assert client.connects == 1
    finally:
        await client.aclose()


async def test_resp3_false_and_push_messages(make_server) -> None:  # type: ignore[no-untyped-def]
    def respond(cmd: list[bytes]) -> bytes:
        if cmd[0] == b"HELLO":
            return b"%1\r\n+proto\r\n:3\r\n"
        if cmd[0] == b"GET":
            # an invalidation push first (answers nothing), then the reply: boolean false
            return b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n#f\r\n"
        return echo_ok(cmd)

    fake = await make_server(respond)
    client = FastRedis(port=fake.port, connections=1, protocol=3)
    try:
        assert await client.get("k") is False
        assert await client.execute("ECHO", b"x") == b"x"
        assert fake.seen[0][:2] == [b"HELLO", b"3"]
    finally:
        await client.aclose()


async def test_connect_sends_auth_select_setname_first(make_server) -> None:  # type: ignore[no-untyped-def]
    fake = await make_server(echo_ok)
    client = FastRedis.from_url(f"redis://bob:s3cr%40t@127.0.0.1:{fake.port}/3")
    try:
        assert await client.ping()
        assert fake.seen[:3] == [
            [b"AUTH", b"bob", b"s3cr@t"],
            [b"SELECT", b"3"],
            [b"CLIENT", b"SETNAME", b"stepup-authz"],
        ]
    finally:
        await client.aclose()


async def test_failed_auth_fails_the_call_and_is_retried_next_time(make_server) -> None:  # type: ignore[no-untyped-def]
    answers = iter([b"-WRONGPASS invalid username-password pair\r\n", b"+OK\r\n"])

    def respond(cmd: list[bytes]) -> bytes:
        return next(answers) if cmd[0] == b"AUTH" else echo_ok(cmd)

    fake = await make_server(respond)
    client = FastRedis(port=fake.port, password="pw", connections=1)
    try:
        with pytest.raises(AuthenticationError):
            await client.ping()
        assert await client.ping()
    finally:
        await client.aclose()


async def test_late_reply_after_a_deadline_is_dropped_not_misdelivered(make_server) -> None:  # type: ignore[no-untyped-def]
    fake = await make_server(lambda c: None if c[0] == b"ECHO" and c[1] == b"slow" else echo_ok(c))
    client = FastRedis(port=fake.port, connections=1)
    try:
        call = asyncio.ensure_future(client.execute("ECHO", b"slow"))
        await fake.wait_held(1)
        call.cancel()  # what a caller's deadline does (asyncio.timeout cancels the await)
        with pytest.raises(asyncio.CancelledError):
            await call
        # The held request is answered now, after the caller gave up...
        writer, _ = fake.held.pop()
        writer.write(b"$4\r\nslow\r\n")
        # ...and the next call on the same connection still gets its own reply.
        assert await asyncio.wait_for(client.execute("ECHO", b"fast"), 5) == b"fast"
        assert client.connects == 1
    finally:
        await client.aclose()


async def test_dropped_connection_fails_waiters_then_reconnects(make_server) -> None:  # type: ignore[no-untyped-def]
    fake = await make_server(lambda c: None if c[0] == b"ECHO" else echo_ok(c))
    client = FastRedis(port=fake.port, connections=1)
    try:
        calls = [asyncio.ensure_future(client.execute("ECHO", b"x")) for _ in range(3)]
        await fake.wait_held(3)
        fake.drop_all()
        for call in calls:
            with pytest.raises(ConnectionError):
                await call
        fake.respond = echo_ok
        assert await client.execute("ECHO", b"back") == b"back"
        assert client.connects == 2
    finally:
        await client.aclose()


async def test_connection_that_stops_answering_is_replaced(make_server) -> None:  # type: ignore[no-untyped-def]
    fake = await make_server(lambda c: None if c[0] == b"ECHO" else echo_ok(c))
    clock = FakeClock()
    client = FastRedis(port=fake.port, connections=1, stale_after_s=0.05, clock=clock)
    try:
        call = asyncio.ensure_future(client.execute("ECHO", b"x"))
        await fake.wait_held(1)
        call.cancel()  # its caller gave up; the request is still unanswered on the connection
        with pytest.raises(asyncio.CancelledError):
            await call
        clock.advance(0.06)
        fake.respond = echo_ok
        # The oldest request has waited past stale_after_s: a new connection answers.
        assert await asyncio.wait_for(client.execute("ECHO", b"y"), 5) == b"y"
        assert client.connects == 2
    finally:
        await client.aclose()


async def test_refused_connection_is_a_connection_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        client = FastRedis(port=port, connect_timeout_s=1)
        with pytest.raises(ConnectionError):
            await client.ping()
        await client.aclose()


async def test_closed_client_refuses_calls(make_server) -> None:  # type: ignore[no-untyped-def]
    fake = await make_server(echo_ok)
    client = FastRedis(port=fake.port)
    assert await client.ping()
    await client.aclose()
    with pytest.raises(ConnectionError):
        await client.ping()


def test_parse_url() -> None:
    assert parse_url("redis://127.0.0.1:6380/2") == {
        "host": "127.0.0.1",
        "port": 6380,
        "path": None,
        "db": 2,
        "username": None,
        "password": None,
        "tls": False,
    }
    u = parse_url("rediss://:pw@redis.internal")
    assert (u["host"], u["port"], u["password"], u["tls"]) == ("redis.internal", 6379, "pw", True)
    u = parse_url("unix:///run/redis.sock?db=4")
    assert (u["path"], u["db"]) == ("/run/redis.sock", 4)
    with pytest.raises(ConfigError):
        parse_url("http://x")
    with pytest.raises(ConfigError):
        parse_url("redis://h/notanumber")


def test_make_fast_redis_only_for_a_plain_url(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert make_fast_redis(RedisSettings(url="redis://127.0.0.1:6379")) is not None
    assert make_fast_redis(RedisSettings(url="redis://h", fast_client=False)) is None
    assert make_fast_redis(RedisSettings()) is None  # embedded: the caller passes the url
    assert make_fast_redis(RedisSettings(), "redis://127.0.0.1:1") is not None
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    with pytest.raises(ConfigError):
        make_fast_redis(RedisSettings(url="redis://:inline@h", password_file=pw))
