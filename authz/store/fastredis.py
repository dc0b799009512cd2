"""A small pipelined Redis client for the Check hot path: EVALSHA / EVAL (and a few plain
commands) over a handful of persistent connections.

Why: redis-py's asyncio client costs ~200 us of CPU per call (connection pool checkout,
command packing in Python, a StreamReader, ``wait_for``); a Check makes one read and one
background write. Here a command is packed by hiredis (``pack_command``, C), written at once
on an ``asyncio.Protocol`` transport, and its reply parsed by ``hiredis.Reader`` (C) and
handed to the waiting future: a few microseconds per call, and any number of calls from
concurrent Checks share one connection (pipelining: replies come back in request order, so
they are matched to requests first in, first out).

What it does and does not do:

- ``redis://``, ``rediss://`` (TLS through an ``ssl.SSLContext``) and ``unix://`` URLs;
  on connect AUTH (URL user/password or ``password``), SELECT (URL db) and
  CLIENT SETNAME, pipelined, before any command is written on the connection.
- RESP2 by default; ``protocol=3`` sends HELLO 3 (push messages are skipped, they answer
  no request).
- No retries and no deadline of its own: the caller bounds each call with
  ``asyncio.timeout``, or gives ``execute_at`` its deadline (a timer on the reply that
  forgives the loop's own stalls); a call that times out leaves its reply to be read and
  dropped when it comes. A connection whose oldest unanswered request is older than
  ``stale_after_s`` is presumed dead and closed (every call waiting on it fails), so a
  server that stops answering cannot pile up requests without bound.
- Errors are redis-py's exception classes so callers need one ``except`` for either
  client: a lost or refused connection raises ``ConnectionError``, a server error reply
  ``ResponseError`` (``NoScriptError`` for NOSCRIPT), ``TimeoutError`` a connect that took
  longer than ``connect_timeout_s``. The next call reconnects.
- Sentinel, Cluster, pub/sub, blocking commands and transactions are not supported:
  redis-py keeps doing everything else (``authz.store.connections``).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
)

from authz.config.settings import RedisSettings
from authz.errors import ConfigError

__all__ = ["FastRedis", "make_fast_redis", "parse_url"]

Arg = str | bytes | int | float
# hiredis' stub types the argument as a one-element tuple; it takes any length.
_pack = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)
_NOT_ENOUGH = object()  # hiredis' "no complete reply yet" marker (RESP3 has a real False)


def _error_reply(err: hiredis.ReplyError) -> RedisError:
    msg = str(err)
    if msg.startswith("NOSCRIPT"):
        return NoScriptError(msg)
    if msg.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
        return AuthenticationError(msg)
    return ResponseError(msg)


def _expire(futs: list[asyncio.Future[Any]]) -> None:
    """A deadline passed: the waiting caller gets TimeoutError; late replies, when they
    come, find their futures done and are dropped (see ``_Conn.data_received``)."""
    for fut in futs:
        if not fut.done():
            fut.set_exception(TimeoutError("redis reply deadline passed"))


# A deadline timer that fires later than this was held up by the loop itself (a garbage
# collection, another task's CPU, a burst of queued checks): see _Deadline.
_STALL_S = 0.001


class _Deadline:
    """The deadline of one reply, on the loop's clock, that does not blame Redis for the
    loop's own stalls. When the timer fires late (the loop was busy elsewhere while the
    reply may have been sitting in the socket), the reply gets one more look: the timer is
    re-armed once, ``_STALL_S`` on, so the loop reads its sockets before the deadline is
    judged again. A reply that came during the stall is then delivered; a server that
    really is late still fails the call, at most one loop pass (and ``_STALL_S``) later."""

    __slots__ = ("_fut", "_loop", "_when", "handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], when: float):
        self._loop = loop
        self._fut = fut
        self._when: float | None = when
        self.handle = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        if self._fut.done():
            return
        when = self._when
        if when is not None and self._loop.time() - when > _STALL_S:
            self._when = None  # once
            self.handle = self._loop.call_later(_STALL_S, self._fire)
            return
        self._fut.set_exception(TimeoutError("redis reply deadline passed"))

    def cancel(self) -> None:
        self.handle.cancel()


class _Conn(asyncio.Protocol):
    """One connection: requests written in order, replies matched to them in order."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
        # (future, monotonic send time) per request not yet answered
        self.waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.closed = False
        self.pending: list[bytes] = []  # packed commands not yet written (see send)

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(ConnectionError(f"redis protocol error: {exc}"))
                return
            if reply is _NOT_ENOUGH:
                return
            if isinstance(reply, hiredis.PushNotification):
                continue  # RESP3 push (e.g. invalidation): answers no request
            if not waiters:
                self._fail(ConnectionError("redis sent a reply nobody asked for"))
                return
            fut, _ = waiters.popleft()
            if fut.done():  # its caller gave up (deadline): drop the late reply
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(_error_reply(reply))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"redis connection lost: {exc or 'closed by the server'}"))

    # -- ours ----------------------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        self.closed = True
        waiters, self.waiters = self.waiters, collections.deque()
        for fut, _ in waiters:
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def send(self, packed: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionError("redis connection closed")
        fut: asyncio.Future[Any] = loop.create_future()
        self.waiters.append((fut, self.clock()))
        # Commands issued by the Checks running in this pass of the event loop go out in one
        # write (one send(2) instead of one per Check), flushed before the loop polls again.
        if not self.pending:
            loop.call_soon(self.flush)
        self.pending.append(packed)
        return fut

    def flush(self) -> None:
        chunks, self.pending = self.pending, []
        if chunks and not self.closed and self.transport is not None:
            self.transport.write(b"".join(chunks) if len(chunks) > 1 else chunks[0])

    def stale(self, now: float, after_s: float) -> bool:
        return bool(self.waiters) and now - self.waiters[0][1] > after_s

    def close(self) -> None:
        self._fail(ConnectionError("redis client closed"))


def parse_url(url: str) -> dict[str, Any]:
    """host, port, path (unix), db, username, password, tls from a redis URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("must start with redis://, rediss:// or unix://", location="redis.url")
    query = parse_qs(parts.query)
    db_text = query.get("db", [""])[0]
    if parts.scheme != "unix" and parts.path.strip("/"):
        db_text = parts.path.strip("/")
    try:
        db = int(db_text) if db_text else 0
    except ValueError:
        raise ConfigError(f"bad database number {db_text!r}", location="redis.url") from None
    password = unquote(parts.password) if parts.password else query.get("password", [None])[0]
    username = unquote(parts.username) if parts.username else None
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 6379,
        "path": unquote(parts.path) if parts.scheme == "unix" else None,
        "db": db,
        "username": username or None,
        "password": password or None,
        "tls": parts.scheme == "rediss",
    }


class FastRedis:
    """``connections`` pipelined connections to one server; calls are spread round-robin.

    ``await client.evalsha(sha, numkeys, *keys_and_args)`` has redis-py's signature, so the
    session store's ``_eval`` works with either client.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        client_name: str | None = "stepup-authz",
        connections: int = 2,
        connect_timeout_s: float = 1.0,
        stale_after_s: float = 1.0,
        protocol: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be >= 1")
        if protocol not in (2, 3):
            raise ValueError("protocol must be 2 or 3")
        self._host, self._port, self._path = host, port, path
        self._ssl, self._server_hostname = ssl_context, server_hostname or host
        self._connect_timeout_s = connect_timeout_s
        self._stale_after_s = stale_after_s
        self._clock = clock  # the send times stale_after_s is measured on (tests inject it)
        self._conns: list[_Conn | None] = [None] * connections
        self._connecting: list[asyncio.Task[_Conn] | None] = [None] * connections
        self._next = 0
        self._closed = False
        hello: list[list[Arg]] = []
        if protocol == 3:
            auth: list[Arg] = ["AUTH", username or "default", password] if password else []
            hello.append(["HELLO", 3, *auth])
        elif password:
            hello.append(["AUTH", username, password] if username else ["AUTH", password])
        if db:
            hello.append(["SELECT", db])
        if client_name:
            hello.append(["CLIENT", "SETNAME", client_name])
        self._hello = hello
        self.connects = 0  # successful connects so far (tests, metrics)

    @classmethod
    def from_url(
        cls, url: str, *, password: str | None = None, ca_file: str | None = None, **kwargs: Any
    ) -> FastRedis:
        """``rediss://`` verifies the server certificate (``ca_file`` or the system store)
        and its host name, as ``redis_conn.make_client`` does. ``password`` (from a file)
        must not also be in the URL."""
        p = parse_url(url)
        if password is not None:
            if p["password"] is not None:
                raise ConfigError(
                    "a password is set both in the URL and in password_file",
                    location="redis.password_file",
                )
            p["password"] = password
        ctx = None
        if p.pop("tls"):
            ctx = ssl.create_default_context(cafile=ca_file)
        return cls(**p, ssl_context=ctx, **kwargs)

    # -- calls ---------------------------------------------------------------------------
    def _pick(self) -> tuple[int, _Conn | None]:
        """The next connection round-robin; None when it must be (re)connected first."""
        if self._closed:
            raise ConnectionError("redis client closed")
        i = self._next
        self._next = (i + 1) % len(self._conns)
        conn = self._conns[i]
        if conn is None or conn.closed:
            return i, None
        if conn.waiters and conn.stale(self._clock(), self._stale_after_s):
            conn.close()  # the server stopped answering on it: fail its calls, reconnect
            return i, None
        return i, conn

    async def execute(self, *args: Arg) -> Any:
        """Send one command and wait for its reply (bound it with ``asyncio.timeout``)."""
        i, conn = self._pick()
        if conn is None:
            conn = await self._connect(i)
        return await conn.send(_pack(args), asyncio.get_running_loop())

    async def execute_at(self, when: float, *args: Arg) -> Any:
        """``execute`` with its reply due by ``when`` (the loop's clock), else builtin
        ``TimeoutError``. One timer on the reply (cheaper than ``asyncio.timeout`` around the
        call), and one that forgives the loop's own stalls (``_Deadline``): a Check whose
        reply arrived while a neighbour held the loop is not failed for it."""
        loop = asyncio.get_running_loop()
        i, conn = self._pick()
        if conn is None:
            async with asyncio.timeout_at(when):
                conn = await self._connect(i)
        fut = conn.send(_pack(args), loop)
        deadline = _Deadline(loop, fut, when)
        try:
            return await fut
        finally:
            deadline.cancel()

    async def pipeline_within(self, deadline_s: float, *commands: tuple[Arg, ...]) -> list[Any]:
        """``commands`` written together on one connection (so a ``WAIT`` among them covers
        the writes before it), within ``deadline_s``. Returns one reply per command, an
        error reply as its exception object (not raised); raises ``ConnectionError`` if the
        connection is lost and builtin ``TimeoutError`` when the deadline passes.

        On a connection that is up, the deadline is one timer on the replies: far cheaper
        than ``asyncio.timeout`` around the call, which the audit-before-access write would
        otherwise pay on every audited allow."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        i, conn = self._pick()
        if conn is None:
            async with asyncio.timeout_at(deadline):
                conn = await self._connect(i)
        futs = [conn.send(_pack(cmd), loop) for cmd in commands]
        timer = loop.call_at(deadline, _expire, futs)
        try:
            results: list[Any] = []
            for fut in futs:
                try:
                    results.append(await fut)
                except ResponseError as exc:
                    results.append(exc)
            return results
        finally:
            timer.cancel()

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Any:
        return await self.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Arg) -> Any:
        return await self.execute("EVAL", script, numkeys, *keys_and_args)

    async def get(self, key: str | bytes) -> Any:
        return await self.execute("GET", key)

    async def set(self, key: str | bytes, value: Arg) -> Any:
        return await self.execute("SET", key, value)

    async def ping(self) -> bool:
        return bool(await self.execute("PING"))

    async def aclose(self) -> None:
        self._closed = True
        for task in self._connecting:
            if task is not None and not task.done():
                task.cancel()
        for conn in self._conns:
            if conn is not None:
                conn.close()
        self._conns = [None] * len(self._conns)

    # -- connections ---------------------------------------------------------------------
    async def _connect(self, i: int) -> _Conn:
        # One connect per slot at a time, shared by every caller that needs it, and shielded:
        # a caller's deadline ends its wait, not the connect the next caller will use.
        task = self._connecting[i]
        if task is None or task.done():
            task = asyncio.ensure_future(self._open(i))
            self._connecting[i] = task
        return await asyncio.shield(task)

    async def _open(self, i: int) -> _Conn:
        loop = asyncio.get_running_loop()
        conn = _Conn(f"conn{i}", self._clock)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if self._path is not None:
                    await loop.create_unix_connection(lambda: conn, self._path)
                else:
                    await loop.create_connection(
                        lambda: conn,
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._server_hostname if self._ssl else None,
                    )
                replies = [conn.send(_pack(tuple(cmd)), loop) for cmd in self._hello]
                for reply in replies:
                    await reply
        except BaseException as exc:
            conn.close()
            if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                raise ConnectionError(f"redis connect failed: {exc}") from exc
            raise
        if self._closed:
            conn.close()
            raise ConnectionError("redis client closed")
        self._conns[i] = conn
        self.connects += 1
        return conn

    @property
    def pending(self) -> int:
        """Requests written and not yet answered, over every connection."""
        return sum(len(c.waiters) for c in self._conns if c is not None)


def make_fast_redis(settings: RedisSettings, url: str | None = None) -> FastRedis | None:
    """The hot-path client for a plain ``url`` (or ``settings.url``); None for Sentinel,
    Cluster or ``fast_client: false`` (the store then runs its scripts through redis-py).
    Same TLS and password rules as ``redis_conn.make_client``."""
    url = url or settings.url
    if not settings.fast_client or url is None or settings.sentinel or settings.cluster:
        return None
    password = None
    if settings.password_file is not None:
        try:
            password = settings.password_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(str(exc), location="redis.password_file") from exc
    deadline_s = settings.deadline_ms / 1000
    return FastRedis.from_url(
        url,
        password=password,
        ca_file=str(settings.ca_file) if settings.ca_file is not None else None,
        connections=settings.fast_connections,
        # A connect, like redis-py's socket timeouts, gets the deadline plus a margin; a
        # request unanswered for 10 deadlines (>= 1 s) means the connection is dead.
        connect_timeout_s=deadline_s + 0.1,
        stale_after_s=max(1.0, 10 * deadline_s),
    )
