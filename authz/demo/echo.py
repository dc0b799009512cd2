"""The demo upstream: answers every method and path with 200 and a JSON echo of the request.

End-to-end tests read it to see exactly what Envoy forwarded: the canonical path, and the
``x-stepup-*`` identity headers the service injected (or stripped).

    python -m authz.demo.echo --host 127.0.0.1 --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from aiohttp import web

_READY_LINE = "echo listening on http://{host}:{port}"


async def _echo(request: web.Request) -> web.Response:
    await request.read()  # drain any body so keep-alive connections stay usable
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        # RFC 9110 section 5.3: repeated fields combine into one comma-separated value.
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return web.json_response(
        {
            # Raw (still percent-encoded) path and query: what Envoy actually sent.
            "method": request.method,
            "path": request.rel_url.raw_path,
            "query": request.rel_url.raw_query_string,
            "headers": headers,
        }
    )


def make_app() -> web.Application:
    """The echo application: one catch-all route for every method."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def start_echo(host: str, port: int) -> web.AppRunner:
    """Start the echo server in the running loop; the caller awaits ``runner.cleanup()``."""
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


def _bound_port(runner: web.AppRunner, fallback: int) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return fallback


async def _serve(host: str, port: int) -> None:
    runner = await start_echo(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(_READY_LINE.format(host=host, port=_bound_port(runner, port)), flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m authz.demo.echo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
