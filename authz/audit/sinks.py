"""Where audit records go, and the ``Auditor`` the service talks to.

Durability, precisely: ``Auditor.durable`` returns once Redis has answered the XADD (and,
when ``wait_replicas`` > 0, once ``WAIT`` reports that many replicas have it). What that
survives depends on the server, which this code cannot see:

- ``appendonly yes`` + ``appendfsync always``: the record is on the primary's disk before
  the reply; it survives a crash of the primary host (not the loss of its disk).
- ``appendfsync everysec`` (the default): up to ~1 s of acknowledged records can be lost if
  the primary host crashes. Use ``wait_replicas`` >= 1 (then a record is in the memory of
  at least two hosts) or ``appendfsync always`` on a dedicated audit instance.
- no persistence and no replica (the embedded Valkey): nothing survives a restart; for
  development only.

A timed-out XADD may still have been applied. The service then denies (``audit-unavailable``)
and emits ``error.fail_closed`` with the same decision id, so such an "allowed" record is
always followed by the denial that superseded it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol, TextIO

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError

from authz.audit.events import AuditEvent, encode_event
from authz.audit.metrics import AuditMetrics
from authz.core.reasons import Reason
from authz.errors import StepupError

log = logging.getLogger("authz.audit")

STREAM_FIELD = b"r"  # the one stream field: the canonical JSON record
AUDIT_UNAVAILABLE = Reason.AUDIT_UNAVAILABLE  # the denial reason when durable() fails


class AuditUnavailable(StepupError):
    """The primary sink did not durably accept a record within its deadline."""

    code = AUDIT_UNAVAILABLE


class AuditTrail(Protocol):
    """What producers of audit events need: ``Auditor`` implements it, and so does
    ``authz.audit.testing.MemoryAuditor`` (unit tests)."""

    def emit(self, event: AuditEvent) -> None: ...
    async def durable(self, event: AuditEvent) -> None: ...
    async def durable_record(self, record: bytes) -> None: ...


class MirrorSink(Protocol):
    """A best-effort copy (stdout for log collectors). Must not block for long. It gets the
    canonical record bytes the stream got (``events.encode_event``)."""

    name: str

    def write_many(self, records: Sequence[bytes]) -> None: ...


class StdoutSink:
    """JSON Lines on stdout (or any text stream), one canonical record per line.

    Written by a thread of its own through a bounded queue: a log reader that stops
    reading fills the pipe and blocks the writer, never the event loop that answers Envoy.
    When the queue is full, ``write_many`` raises ``BlockingIOError`` and the Auditor counts
    those records as this sink's errors (the stream, the primary sink, has them)."""

    name = "stdout"

    def __init__(self, stream: TextIO | None = None, *, queue_size: int = 10_000) -> None:
        self._stream = stream
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="audit-stdout", daemon=True)
        self._thread.start()

    def write_many(self, records: Sequence[bytes]) -> None:
        text = "".join(r.decode("ascii") + "\n" for r in records)
        try:
            self._queue.put_nowait(text)
        except queue.Full:
            raise BlockingIOError("audit stdout mirror: queue full") from None

    def _run(self) -> None:
        while (text := self._queue.get()) is not None:
            out = self._stream or sys.stdout
            try:
                out.write(text)
                out.flush()
            except (OSError, ValueError):  # a closed or broken stdout: nothing to write to
                log.warning("audit stdout mirror: write failed", exc_info=True)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (bounded by ``timeout_s``), then stop the thread."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)


class RedisStreamSink:
    """XADD to a Redis Stream. No MAXLEN on XADD: only the exporter trims, and only what it
    has archived and fsync'ed (XTRIM MINID), so an exporter outage never loses records."""

    name = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        stream_key: str,
        deadline_ms: int,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 50,
        fast: Any = None,
    ) -> None:
        if wait_replicas and wait_timeout_ms >= deadline_ms:
            raise ValueError("wait_timeout_ms must be below the durable deadline")
        self.client = client
        # The Check path's pipelined transport (authz.store.fastredis.FastRedis) on the
        # same server: an audit-before-access record costs one cheap command, not a redis-py
        # pipeline. It raises redis-py's error types, so failures map the same way.
        self.fast = fast
        self.stream_key = stream_key
        self.deadline_s = deadline_ms / 1000
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms

    def check_results(self, results: Sequence[Any]) -> None:
        """Raise AuditUnavailable unless the XADD (and the WAIT) succeeded."""
        if not results or isinstance(results[0], BaseException) or not results[0]:
            raise AuditUnavailable("XADD failed")
        if self.wait_replicas:
            acked = results[1] if len(results) > 1 else None
            if (
                isinstance(acked, BaseException)
                or not isinstance(acked, int)
                or acked < self.wait_replicas
            ):
                raise AuditUnavailable(f"WAIT: {acked!r} of {self.wait_replicas} replicas")

    async def write(self, record: bytes) -> None:
        """One encoded record, durably (see the module docstring), within the deadline."""
        try:
            wait = (
                (("WAIT", self.wait_replicas, self.wait_timeout_ms),) if self.wait_replicas else ()
            )
            if self.fast is not None:
                # XADD (+ WAIT on the same connection), the deadline a timer on the replies.
                results = await self.fast.pipeline_within(
                    self.deadline_s, ("XADD", self.stream_key, "*", STREAM_FIELD, record), *wait
                )
            else:  # Sentinel / Cluster: redis-py, one pipeline (one connection)
                async with asyncio.timeout(self.deadline_s):
                    async with self.client.pipeline(transaction=False) as pipe:
                        pipe.xadd(self.stream_key, {STREAM_FIELD: record})
                        for cmd in wait:
                            pipe.execute_command(*cmd)
                        results = await pipe.execute(raise_on_error=False)
        # asyncio.TimeoutError is an OSError; RedisClusterException is not a RedisError.
        except (RedisError, RedisClusterException, OSError) as exc:
            raise AuditUnavailable(f"audit write failed: {type(exc).__name__}") from exc
        self.check_results(results)

    async def write_many(self, records: Sequence[bytes], timeout_s: float) -> None:
        """A batch in one round trip (no WAIT: these are the non-critical events)."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self.client.pipeline(transaction=False) as pipe:
                    for r in records:
                        pipe.xadd(self.stream_key, {STREAM_FIELD: r})
                    results = await pipe.execute(raise_on_error=False)
        except (RedisError, RedisClusterException, OSError) as exc:
            raise AuditUnavailable(f"audit batch failed: {type(exc).__name__}") from exc
        failed = sum(1 for r in results if isinstance(r, BaseException) or not r)
        if failed:
            # Individual XADD errors (OOM, wrong type) are not transient in a useful way.
            raise AuditUnavailable(f"{failed} of {len(records)} XADDs failed")


class Auditor:
    """The service's audit API.

    - ``await durable(event)``: audit before access; raises ``AuditUnavailable``.
      ``durable_record(bytes)`` is the same for a record already encoded (the Check path
      encodes its audited allow directly: ``mapping.allowed_record``).
    - ``emit(event)``: never blocks; a bounded buffer drained in batches by a background
      task (``start()``/``aclose()``). When the buffer is full the event is dropped and
      counted in ``audit_dropped_total``. While Redis is down the drainer keeps the batch
      it holds and retries with capped backoff; new events fill the buffer up to its bound.
    Call both from the event loop's thread.
    """

    def __init__(
        self,
        primary: RedisStreamSink,
        *,
        metrics: AuditMetrics,
        buffer_size: int = 10_000,
        batch_size: int = 256,
        mirrors: Sequence[MirrorSink] = (),
        batch_timeout_s: float = 1.0,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.primary = primary
        self.metrics = metrics
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.mirrors = tuple(mirrors)
        self.batch_timeout_s = batch_timeout_s
        self.max_backoff_s = max_backoff_s
        self._buffer: collections.deque[AuditEvent] = collections.deque()
        self._pending: list[bytes] = []  # the batch being written, encoded (retried on failure)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_drop_log = 0.0
        # The labelled children the hot path counts with (labels() is a dict lookup + lock).
        self._redis_ok = metrics.events.labels(sink="redis", result="ok")
        self._redis_error = metrics.events.labels(sink="redis", result="error")

    # -- audit before access ---------------------------------------------------------
    async def durable(self, event: AuditEvent) -> None:
        await self.durable_record(encode_event(event))

    async def durable_record(self, record: bytes) -> None:
        try:
            await self.primary.write(record)
        except AuditUnavailable:
            self._redis_error.inc()
            raise
        self.accepted(record)

    def accepted(self, record: bytes) -> None:
        self._redis_ok.inc()
        if self.mirrors:
            self._mirror([record])

    # -- non-critical events ---------------------------------------------------------
    def emit(self, event: AuditEvent) -> None:
        if self._closing or len(self._buffer) >= self.buffer_size:
            self._drop(1, "buffer full" if not self._closing else "auditor closed")
            return
        self._buffer.append(event)
        self.metrics.buffered.set(len(self._buffer))
        self._wakeup.set()

    @property
    def backlog(self) -> int:
        return len(self._buffer) + len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit-drain")

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything emitted so far is written; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.backlog and time.monotonic() < deadline:
            self._wakeup.set()
            await asyncio.sleep(0.005)
        return not self.backlog

    async def aclose(self, drain_timeout_s: float = 5.0) -> None:
        """Stop accepting, drain what is buffered (bounded), count the rest as dropped."""
        self._closing = True
        if self._task is not None:
            await self.flush(drain_timeout_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        left = self.backlog
        if left:
            self._drop(left, "unwritten at shutdown")
            self._buffer.clear()
            self._pending = []
        self.metrics.buffered.set(0)
        for m in self.mirrors:
            close = getattr(m, "close", None)
            if close is not None:
                await asyncio.to_thread(close)

    def _drop(self, n: int, why: str) -> None:
        self.metrics.dropped.inc(n)
        now = time.monotonic()
        if now - self._last_drop_log >= 1.0:  # rate-limited: a flood must not flood the log
            self._last_drop_log = now
            log.error("audit records dropped", extra={"count": n, "cause": why})

    def _mirror(self, records: Sequence[bytes]) -> None:
        for m in self.mirrors:
            try:
                m.write_many(records)
            except (OSError, ValueError):
                self.metrics.events.labels(sink=m.name, result="error").inc(len(records))
            else:
                self.metrics.events.labels(sink=m.name, result="ok").inc(len(records))

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if not self._pending:
                if not self._buffer:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                n = min(self.batch_size, len(self._buffer))
                self._pending = [encode_event(self._buffer.popleft()) for _ in range(n)]
                self.metrics.buffered.set(len(self._buffer))
                self._mirror(self._pending)
            try:
                await self.primary.write_many(self._pending, self.batch_timeout_s)
            except AuditUnavailable as exc:
                self.metrics.events.labels(sink="redis", result="error").inc(len(self._pending))
                log.warning(
                    "audit batch not written; retrying",
                    extra={"error": str(exc), "count": len(self._pending)},
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            self.metrics.events.labels(sink="redis", result="ok").inc(len(self._pending))
            self._pending = []
            backoff = 0.05
