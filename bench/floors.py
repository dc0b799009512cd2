"""The two floors: ext_authz servers that decide nothing and answer allow at once.

``python -m bench.floors grpc --port P --answer FILE`` — a ``grpc.aio`` Authorization
servicer (the same server options as ``authz.check.grpc_server.GrpcServer``) whose ``Check``
returns one CheckResponse, parsed once from FILE (serialised protobuf).

``python -m bench.floors grpc --port P --answer FILE --await-redis URL`` — the same servicer,
but each ``Check`` first awaits one ``GET`` through the service's own Redis client
(``authz.store.fastredis.FastRedis``) and discards its reply: what a grpc.aio handler that
suspends once on Redis costs, before any decision (scenario 6r). The no-op floor returns
without suspending, so the service's "above the floor" in gRPC mode holds this too.

``python -m bench.floors http --port P --answer FILE`` — an asyncio Protocol that frames
HTTP/1.1 requests on ``\\r\\n\\r\\n`` and writes FILE's bytes (one complete response) for each.

Both run on uvloop with the start-up objects frozen out of the GC, as ``stepup-authz serve``
does. The harness (bench.run) writes FILE from the real service's own answer to the
scenario's request (same headers, same metadata, same body), so a floor costs what a Python
server of that kind costs to receive a check and send that very answer: what is left of the
service's CPU per check above it is the project's code. ``--record FILE`` keeps the first
request head a floor received (what Envoy really sends, for bench.micro's request).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
import time
from pathlib import Path

import uvloop


class _Recorder:
    """Keeps the first request only: afterwards ``pending`` is False and costs one test."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.pending = path is not None

    def keep(self, data: bytes) -> None:
        self.pending = False
        assert self.path is not None
        self.path.write_bytes(data)


class _HttpConn(asyncio.Protocol):
    def __init__(self, answer: bytes, record: _Recorder) -> None:
        self.answer = answer
        self.record = record
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if self.record.pending:
                self.record.keep(bytes(buf[: end + 4]))
            del buf[: end + 4]
            assert self.transport is not None
            self.transport.write(self.answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve_http(port: int, answer: bytes, record: _Recorder, stop: asyncio.Event) -> None:
    if not answer.startswith(b"HTTP/1.1 200 "):
        raise SystemExit("the HTTP floor answers allow: its answer must be a 200")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _HttpConn(answer, record), "127.0.0.1", port, reuse_port=True, backlog=1024
    )
    _ready()
    await stop.wait()
    server.close()
    await server.wait_closed()


async def serve_grpc(
    port: int,
    answer: bytes,
    record: _Recorder,
    stop: asyncio.Event,
    await_redis: str | None = None,
    spin_us: int = 0,
) -> None:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

    response = external_auth_pb2.CheckResponse.FromString(answer)
    if response.status.code != 0 or not response.HasField("ok_response"):
        raise SystemExit("the gRPC floor answers allow: its answer must be an OkResponse")

    class Floor(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
        async def Check(
            self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
        ) -> external_auth_pb2.CheckResponse:
            if record.pending:
                record.keep(request.SerializeToString())
            return response

    class AwaitingFloor(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
        async def Check(
            self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
        ) -> external_auth_pb2.CheckResponse:
            await redis.get(b"stepup:bench:floor")
            if spin_s:
                _spin(spin_s)
            return response

    redis = None
    servicer: object = Floor()
    spin_s = spin_us / 1e6
    if await_redis is not None:
        from authz.store.fastredis import FastRedis

        redis = FastRedis.from_url(await_redis, client_name="stepup-bench-floor")
        await redis.ping()  # connected before the first check, as the service is
        servicer = AwaitingFloor()

    # The options of authz.check.grpc_server.GrpcServer: the same server, minus the decision.
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", 1 << 20),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ]
    )
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    _ready()
    await stop.wait()
    await server.stop(0.5)
    if redis is not None:
        await redis.aclose()


def _spin(seconds: float) -> None:
    """Python on the loop for ``seconds`` of this thread's CPU: what a decision of that cost
    looks like to grpc.aio (the GIL held, the loop busy), without any decision."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _ready() -> None:
    gc.collect()
    gc.freeze()
    print("ready", flush=True)


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    answer = args.answer.read_bytes()
    if args.mode == "grpc":
        await serve_grpc(
            args.port, answer, _Recorder(args.record), stop, args.await_redis, args.spin_us
        )
    else:
        await serve_http(args.port, answer, _Recorder(args.record), stop)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.floors",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mode", choices=("grpc", "http"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--answer", type=Path, required=True, help="the answer to send, as bytes")
    p.add_argument("--record", type=Path, help="write the first request received here")
    p.add_argument(
        "--await-redis",
        metavar="URL",
        help="grpc only: each Check awaits one GET on this Redis first (scenario 6r)",
    )
    p.add_argument(
        "--spin-us",
        type=int,
        default=0,
        metavar="N",
        help="with --await-redis: after the reply, N us of Python on the loop (as a decision)",
    )
    args = p.parse_args(argv)
    if args.await_redis and args.mode != "grpc":
        p.error("--await-redis is for the grpc floor")
    if args.spin_us and not args.await_redis:
        p.error("--spin-us needs --await-redis")
    uvloop.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
