"""An open-loop HTTP/1.1 load generator with evenly spaced arrivals (the fixed-rate runs).

``python -m bench.openloop --rate 2000 --duration 8 --warmup 1 --log-file F URL [-H 'k: v']``

Why not h2load's ``--rps``: it starts requests in bursts. Measured here at 2,000 req/s
(8 clients x 250/s) for 5 s, its 10,000 requests fell into only 588 distinct milliseconds,
up to 24 in one millisecond: a single-threaded service then queues a whole burst, and the
"p99 at 2,000/s" measures the burst, not the rate. wrk2 (which spaces requests evenly) is not
packaged.

Here request ``i`` is due at ``t0 + i / rate`` (libuv timers: 1 ms granularity, so at
2,000/s two requests share a millisecond). It goes out on an idle keep-alive connection, or a
new one (up to ``--max-conns``; beyond that it waits for one, its wait counted). Latency is
measured from when the request was *due*, not when it was sent, so a slow server cannot hide
behind a slowed-down client (no coordinated omission). The log has h2load's format (start in
us since the epoch, status, latency in us; tab-separated), one line per request after the
warm-up; a request that failed (connection error) is logged with status -1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import collections.abc
import contextlib
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import uvloop


class _Conn(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.due = 0.0
        self.on_done: collections.abc.Callable[[int], None] | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buf) < end + 4 + length:
            return
        del self.buf[: end + 4 + length]
        status = int(head.split(" ", 2)[1])
        done, self.on_done = self.on_done, None
        self.pool.idle.append(self)
        if done is not None:
            done(status)
        self.pool.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        done, self.on_done = self.on_done, None
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        self.pool.open -= 1
        if done is not None:
            done(-1)
        self.pool.wake()


class Pool:
    def __init__(self, host: str, port: int, request: bytes, max_conns: int) -> None:
        self.host, self.port, self.request, self.max_conns = host, port, request, max_conns
        self.idle: collections.deque[_Conn] = collections.deque()
        self.open = 0
        self.connecting: set[asyncio.Task[None]] = set()
        self.waiting: collections.deque[tuple[float, collections.abc.Callable[[int], None]]] = (
            collections.deque()
        )

    def submit(self, due: float, done: collections.abc.Callable[[int], None]) -> None:
        self.waiting.append((due, done))
        self.wake()

    def wake(self) -> None:
        while self.waiting and self.idle:
            conn = self.idle.popleft()
            _, done = self.waiting.popleft()
            conn.on_done = done
            assert conn.transport is not None
            conn.transport.write(self.request)
        if self.waiting and self.open < self.max_conns:
            self.open += 1
            task = asyncio.ensure_future(self._connect())
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except OSError:
            self.open -= 1
            if self.waiting:
                _, done = self.waiting.popleft()
                done(-1)
            return
        self.idle.append(conn)
        self.wake()


async def run(
    url: str, headers: list[str], rate: float, duration: float, warmup: float, max_conns: int
) -> list[tuple[int, int, int]]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    lines = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", *headers, "", ""]
    pool = Pool(host, port, "\r\n".join(lines).encode(), max_conns)
    loop = asyncio.get_running_loop()
    rows: list[tuple[int, int, int]] = []
    pending = 0
    fired = 0
    total = int(rate * (warmup + duration))
    t0 = loop.time() + 0.05  # the timers (libuv: ms resolution)
    p0 = time.perf_counter() + 0.05  # the measurement (uvloop's loop.time() is in ms)
    wall0 = time.time() + 0.05

    def fire(i: int) -> None:
        nonlocal pending, fired
        due = p0 + i / rate
        pending += 1
        fired += 1

        # Latency runs from when the request was due, or from when it really left if a libuv
        # timer fired early (its clock is cached per loop pass, in ms): never negative.
        start = min(due, time.perf_counter())

        def done(status: int) -> None:
            nonlocal pending
            pending -= 1
            if i >= rate * warmup:
                rows.append(
                    (
                        int((wall0 + i / rate) * 1e6),
                        status,
                        int((time.perf_counter() - start) * 1e6),
                    )
                )

        pool.submit(due, done)

    scheduled = 0
    while scheduled < total:  # one second of timers at a time: a small timer heap
        batch_end = min(total, scheduled + int(rate))
        for i in range(scheduled, batch_end):
            loop.call_at(t0 + i / rate, fire, i)
        scheduled = batch_end
        await asyncio.sleep(max(0.0, t0 + scheduled / rate - loop.time() - 0.5))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(duration + warmup + 30):
            while fired < total or pending:  # noqa: ASYNC110 (counters set by callbacks)
                await asyncio.sleep(0.02)
    for conn in list(pool.idle):
        if conn.transport is not None:
            conn.transport.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.openloop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url")
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--max-conns", type=int, default=256)
    p.add_argument("-H", "--header", action="append", default=[])
    p.add_argument("--log-file", type=Path, required=True)
    args = p.parse_args(argv)
    rows = uvloop.run(
        run(args.url, args.header, args.rate, args.duration, args.warmup, args.max_conns)
    )
    rows.sort()
    args.log_file.write_text("".join(f"{s}\t{st}\t{lat}\n" for s, st, lat in rows))
    ok = sum(1 for _, st, _ in rows if st > 0)
    print(f"{len(rows)} requests logged, {ok} answered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
