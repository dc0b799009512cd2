"""The HTTP ext_authz listener: a plain asyncio Protocol answering Envoy's ``http_service``.

Why not aiohttp: every Check is one tiny header-only request from Envoy, so the whole cost
is per-request overhead. A Protocol that finds ``\\r\\n\\r\\n``, splits the lines and
writes one pre-assembled ``bytes`` answer costs a few microseconds. httptools (llhttp)
parses a typical check head (a 700-byte token, 11 headers) in 2.6 us against 5 us for the
strict parser below: 2.5 us of the ~70 us of service CPU a check costs in this mode, not
enough to add a native dependency. The parser refuses anything it does not fully understand.

Bounds (``HttpAuthzSettings``): ``max_header_bytes`` and ``max_headers`` per request (past
them: 431 and close); ``header_timeout_s`` from a connection's open, or a request's first
byte, to its complete head (a head trickled byte by byte is refused at it, however slowly
the bytes come); ``request_timeout_s`` from the head to its answer; ``idle_timeout_s``
between keep-alive requests; ``max_connections`` open at once and
``max_connections_per_source`` from one address. At either connection limit the
longest-idle connection without a check in flight (of that source, or of the source
holding the most) is closed for the new one: idle or trickling sockets cannot lock Envoy
out; only when every connection has a check in flight is a new one refused (403).
Requests on one connection are answered in order (keep-alive and pipelining) by a loop,
never a recursion; while a check runs, further pipelined bytes are buffered up to one more
request's worth, then reading pauses, as it does while the peer does not read its answers.
Every timer reads one clock (``clock``, injectable).

Fail closed: every error answers 403 (never 200). A request that was read but cannot be
interpreted (bad path, missing host, unknown level) gets the same 403 ``bad-request`` or
``bad-path`` as the gRPC mode and the connection stays usable; a stream we cannot frame
(bad request line, bad header syntax, too large, a body, a timeout) gets a 403 with
``connection: close`` and is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from ssl import SSLContext
from typing import cast

from authz.check.authorizer import Authorizer
from authz.check.request import attributes_from_http
from authz.check.response import HttpResponseBuilder, refusal
from authz.config.settings import HttpAuthzSettings
from authz.core.attributes import RequestAttributes
from authz.core.decision import Decision, Outcome, failed, refused
from authz.core.reasons import Reason
from authz.errors import RequestError
from authz.ops.tls import server_context

log = logging.getLogger("authz.check.http_server")

# Every header line: an RFC 9110 section 5.1 token, a colon, a value without control
# characters (HTAB ok). No whitespace before the colon (RFC 9112 section 5.1: a request
# smuggling vector) and no obs-fold (a line starting with whitespace is not a token). One
# match over the whole block costs less than one per line (5 us for a typical head).
_BLOCK = re.compile(r"(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*)*")
# Any case: a lower-case method is framed, then refused as method-not-canonical.
_METHOD = re.compile(r"[A-Za-z]{1,20}")
_VERSIONS = {"HTTP/1.1": True, "HTTP/1.0": False}  # version -> keep-alive by default
_SWEEP_S = 0.25


class _Unframeable(Exception):
    """The stream cannot be read on: answer 403 and close."""

    def __init__(self, reason: Reason, message: str, status: int = 403) -> None:
        self.reason = reason
        self.status = status
        super().__init__(message)


def parse_head(head: str, max_headers: int) -> tuple[str, str, dict[str, str], bool]:
    """(method, target, headers, keep_alive) from a request head without its blank line.

    Raises ``_Unframeable`` for anything that is not strict HTTP/1.1 (or 1.0) without a
    body. Header names are lower-cased; a repeated name is refused (Envoy sends each once).
    """
    request_line, _, block = head.partition("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise _Unframeable(Reason.BAD_REQUEST, "bad request line")
    method, target, version = parts
    keep_alive = _VERSIONS.get(version)
    if keep_alive is None or _METHOD.fullmatch(method) is None or not target:
        raise _Unframeable(Reason.BAD_REQUEST, "bad request line")
    headers: dict[str, str] = {}
    if block:
        if _BLOCK.fullmatch("\r\n" + block) is None:
            raise _Unframeable(Reason.BAD_REQUEST, "bad header line")
        lines = block.split("\r\n")
        if len(lines) > max_headers:
            raise _Unframeable(Reason.BAD_REQUEST, "too many headers", status=431)
        for line in lines:
            name, _, value = line.partition(":")
            name = name.lower()
            if name in headers:
                raise _Unframeable(Reason.BAD_REQUEST, "repeated header")
            headers[name] = value.strip(" \t")
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        # Envoy sends no body unless with_request_body is configured; we never read one.
        raise _Unframeable(Reason.BAD_REQUEST, "request body")
    conn = headers.get("connection")
    if conn is not None:
        option = conn.lower()
        if option == "close":
            keep_alive = False
        elif option == "keep-alive":
            keep_alive = True
    return method, target, headers, keep_alive


_EXPECTED_TIMEOUT = "x-envoy-expected-rq-timeout-ms"


def expected_timeout_s(headers: dict[str, str]) -> float | None:
    """How long Envoy waits for this check's answer (``x-envoy-expected-rq-timeout-ms``, set
    by Envoy's router on the ext_authz request), in seconds; None when absent or not a
    plain count of milliseconds (then the check has no deadline of Envoy's)."""
    raw = headers.get(_EXPECTED_TIMEOUT)
    if raw is None or not raw.isdigit() or len(raw) > 9:
        return None
    return int(raw) / 1000


class HttpAuthzServer:
    """Envoy's HTTP ext_authz protocol served from ``Authorizer.check``. Its limits and
    address are ``HttpAuthzSettings`` (``http_authz`` in the settings file).

    ``clock`` (seconds, monotonic; default the event loop's) is what every timer reads:
    tests inject one and call ``expire_due()`` instead of waiting for time to pass."""

    def __init__(
        self,
        authorizer: Authorizer,
        responses: HttpResponseBuilder,
        settings: HttpAuthzSettings,
        *,
        clock: Callable[[], float] | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        self.authorizer = authorizer
        self.responses = responses
        self.settings = settings
        self.host, self._port = settings.host, settings.port
        self.path_prefix = settings.path_prefix
        self.peer_header = settings.peer_header.lower()
        self.max_header_bytes = settings.max_header_bytes
        self.max_headers = settings.max_headers
        self.request_timeout_s = settings.request_timeout_s
        self.header_timeout_s = settings.header_timeout_s
        self.idle_timeout_s = settings.idle_timeout_s
        self.max_connections = settings.max_connections
        self.max_per_source = settings.max_connections_per_source
        self.clock = clock
        self.ssl = ssl
        self.closing = False
        self.conns: set[_Conn] = set()
        self.by_source: dict[str, set[_Conn]] = {}
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    def now(self) -> float:
        return self.clock() if self.clock is not None else asyncio.get_running_loop().time()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self),
            self.host,
            self._port,
            reuse_port=True,
            backlog=1024,
            ssl=self.ssl,
            # The TLS handshake is part of the head's time budget.
            ssl_handshake_timeout=self.header_timeout_s if self.ssl is not None else None,
        )
        self._sweeper = loop.create_task(self._sweep())

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight checks answer (with ``connection: close``), close
        idle keep-alive connections at once, and abort whatever is left after ``grace``."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            conn.close_if_idle()
        if self.conns:
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        for conn in list(self.conns):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            await self._server.wait_closed()

    def admit(self, conn: _Conn) -> bool:
        """Make room for ``conn`` (from ``conn.source``) and count it; False: refuse it.

        Past the source's limit, that source's own longest-idle connection without a check
        in flight is closed; past the total, the one of the source holding the most. Only
        when every candidate has a check in flight is the new connection refused."""
        mine = self.by_source.get(conn.source, set())
        if len(mine) >= self.max_per_source and not _evict(mine):
            return False
        if len(self.conns) >= self.max_connections:
            sources = sorted(self.by_source.values(), key=len, reverse=True)
            if not any(_evict(group) for group in sources):
                return False
        self.conns.add(conn)
        self.by_source.setdefault(conn.source, set()).add(conn)
        return True

    def forget(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        group = self.by_source.get(conn.source)
        if group is not None:
            group.discard(conn)
            if not group:
                del self.by_source[conn.source]
        if not self.conns:
            self._drained.set()

    async def _sweep(self) -> None:
        # One timer for every connection: cheaper than a call_later per request.
        while True:
            await asyncio.sleep(_SWEEP_S)
            self.expire_due()

    def expire_due(self) -> None:
        """Act on every connection whose deadline has passed (the sweeper calls it)."""
        now = self.now()
        for conn in list(self.conns):
            if conn.deadline <= now:
                conn.expire()

    def record_refusal(self, reason: Reason) -> str:
        """Count and log a request refused before it could be read; its decision id."""
        return self.authorizer.unread(refused(reason)).decision_id


def _evict(group: set[_Conn]) -> bool:
    """Close the longest-idle connection of ``group`` with no check in flight (an idle one
    before one still sending its head); False when every one has a check in flight."""
    candidates = [c for c in group if c.task is None and c.transport is not None]
    if not candidates:
        return False
    victim = min(candidates, key=lambda c: (bool(c.buf), c.since))
    victim.evict()
    return True


class _Conn(asyncio.Protocol):
    def __init__(self, server: HttpAuthzServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.source = ""
        self.buf = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.close_after = False
        self.read_paused = False
        self.write_paused = False
        self.deadline = 0.0
        self.since = 0.0  # when it last became idle (or opened)
        self.timed_out = False
        # A request head plus the blank line, and what we hold while a check runs.
        self.limit = server.max_header_bytes
        self.hold = 2 * server.max_header_bytes

    # -- asyncio callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        srv = self.server
        peer = transport.get_extra_info("peername")
        self.source = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        now = srv.now()
        self.since = now
        if srv.closing or not srv.admit(self):
            # Envoy sees a 403 (fail closed), never a silent reset it might retry as allow.
            did = srv.record_refusal(Reason.INTERNAL_ERROR)
            transport.write(refusal(srv.responses, Reason.INTERNAL_ERROR, did))
            transport.close()
            self.transport = None
            return
        # Envoy connects to send a request: a new connection gets the head's budget, not
        # the keep-alive idle time.
        self.deadline = now + srv.header_timeout_s

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.transport = None
        self.server.forget(self)

    def pause_writing(self) -> None:
        # The peer does not read its answers: stop reading its requests until it does.
        self.write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._next()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        if not self.buf and self.task is None:
            self.deadline = self.server.now() + self.server.header_timeout_s
        self.buf += data
        if self.task is None:
            self._next()
        else:
            self._flow()

    def eof_received(self) -> bool | None:
        # A half-closed peer sends no more requests; answer the one in flight, then close.
        self.close_after = True
        if self.task is None and self.transport is not None:
            self.transport.close()
        return True

    # -- request handling -------------------------------------------------------------------
    def _flow(self) -> None:
        """Pause reading while answers do not drain or a check runs with enough buffered."""
        transport = self.transport
        if transport is None:
            return
        pause = self.write_paused or len(self.buf) > self.hold
        if pause != self.read_paused:
            self.read_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _next(self) -> None:
        """Answer what is buffered, in order, until a check must wait or the data ends.

        A loop, not a recursion: a pipelined stream of requests answered without a check
        (bad paths) must not grow the stack."""
        srv = self.server
        while self.task is None and self.transport is not None and not self.write_paused:
            buf = self.buf
            if not buf:
                self.since = srv.now()
                self.deadline = self.since + srv.idle_timeout_s
                break
            end = buf.find(b"\r\n\r\n", 0, self.limit + 4)
            if end < 0:
                if len(buf) >= self.limit + 4:
                    self._refuse(Reason.BAD_REQUEST, "request head too large", status=431)
                break
            head = buf[:end].decode("latin-1")
            del buf[: end + 4]
            try:
                method, target, headers, keep_alive = parse_head(head, srv.max_headers)
            except _Unframeable as exc:
                self._refuse(exc.reason, str(exc), status=exc.status)
                break
            if not keep_alive:
                self.close_after = True
            self.deadline = srv.now() + srv.request_timeout_s
            try:
                attrs = attributes_from_http(
                    method,
                    target,
                    headers,
                    path_prefix=srv.path_prefix,
                    peer_header=srv.peer_header,
                )
            except RequestError as exc:
                answer = srv.authorizer.unread(refused(exc.reason))
                close = self.close_after or srv.closing
                self._write(
                    srv.responses.build(answer.decision, None, answer.decision_id, close=close).wire
                )
                if buf and self.transport is not None:
                    self.deadline = srv.now() + srv.header_timeout_s
                continue
            # Envoy's deadline, from when the request was read: a Check still queued at it is
            # shed as overloaded before any Redis call (Authorizer.check).
            deadline = srv.authorizer.deadline_in(expected_timeout_s(headers))
            self.task = self.loop.create_task(self._check(attrs, deadline))
        self._flow()

    async def _check(self, attrs: RequestAttributes, deadline: float | None = None) -> None:
        srv = self.server
        try:
            result = await srv.authorizer.check(attrs, deadline)
            wire = srv.responses.build(
                result.decision, attrs, result.decision_id, close=self.close_after or srv.closing
            ).wire
        except asyncio.CancelledError:
            if not self.timed_out:
                raise  # the connection went away
            late = srv.authorizer.unread(
                failed(Reason.DEADLINE_EXCEEDED), attrs, srv.request_timeout_s
            )
            wire = srv.responses.build(late.decision, attrs, late.decision_id, close=True).wire
            self.close_after = True
        except Exception:
            # Building the answer failed (check() itself never raises): deny, never allow.
            log.exception("could not answer a check")
            err = srv.authorizer.unread(failed(Reason.INTERNAL_ERROR))
            wire = refusal(srv.responses, Reason.INTERNAL_ERROR, err.decision_id)
            self.close_after = True
        self.task = None
        self._write(wire)
        if self.buf and self.transport is not None:
            self.deadline = srv.now() + srv.header_timeout_s  # a pipelined request's head
        self._next()

    def _write(self, wire: bytes) -> None:
        """Send one answer; close after it when asked to."""
        transport = self.transport
        if transport is None:
            return
        transport.write(wire)
        if self.close_after or self.server.closing:
            self.buf.clear()
            self._close()

    def _refuse(self, reason: Reason, message: str, *, status: int = 403) -> None:
        log.warning("refused an unreadable check request: %s", message)
        srv = self.server
        did = srv.record_refusal(reason)
        self.buf.clear()
        self.close_after = True
        if status == 403:
            wire = refusal(srv.responses, reason, did)
        else:  # 431: the same denial, under the status that names the problem
            deny = Decision(Outcome.DENY, reason)
            _, headers, body = srv.responses.headers_for(deny, None, did)
            wire = srv.responses.encode(status, headers, body.encode(), close=True)
        self._write(wire)

    # -- timers and shutdown ----------------------------------------------------------------
    def expire(self) -> None:
        if self.transport is None:
            return
        if self.task is not None:
            self.timed_out = True
            self.task.cancel()  # _check answers 403 deadline-exceeded and closes
        elif self.buf:
            self._refuse(Reason.DEADLINE_EXCEEDED, "request head not received in time")
        else:
            self._close()  # idle keep-alive connection

    def evict(self) -> None:
        """Make room for a new connection: this one has no check in flight."""
        if self.buf:
            log.warning("closed a connection still sending its head to admit another")
        self._close()

    def _close(self) -> None:
        transport = self.transport
        if transport is not None:
            self.transport = None
            transport.close()
            # Count it gone now: connection_lost comes on a later loop iteration.
            self.server.forget(self)

    def close_if_idle(self) -> None:
        self.close_after = True
        if self.task is None and not self.buf and self.transport is not None:
            self._close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def maybe_start(
    settings: HttpAuthzSettings,
    authorizer: Authorizer,
    responses: HttpResponseBuilder,
) -> HttpAuthzServer | None:
    """Start the HTTP ext_authz listener when ``settings.enabled``; None otherwise."""
    if not settings.enabled:
        return None
    ssl = None
    if settings.tls is not None:
        ssl = server_context(settings.tls, "http_authz")
    server = HttpAuthzServer(authorizer, responses, settings, ssl=ssl)
    await server.start()
    log.info(
        "HTTP ext_authz serving",
        extra={
            "address": f"{settings.host}:{server.port}",
            "path_prefix": settings.path_prefix,
            "tls": "mtls" if ssl and ssl.verify_mode else "tls" if ssl else "off",
        },
    )
    return server
