"""The demo upstream: answers every method and path with 200 and an echo of the request:
JSON for API clients, an HTML table of the headers for browsers (``Accept: text/html``
without ``application/json``).

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
from html import escape

from aiohttp import web

_READY_LINE = "echo listening on http://{host}:{port}"


async def _echo(request: web.Request) -> web.Response:
    await request.read()  # drain any body so keep-alive connections stay usable
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        # RFC 9110 section 5.3: repeated fields combine into one comma-separated value.
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    doc: dict[str, object] = {
        # Raw (still percent-encoded) path and query: what Envoy actually sent.
        "method": request.method,
        "path": request.rel_url.raw_path,
        "query": request.rel_url.raw_query_string,
        "headers": headers,
    }
    accept = request.headers.get("Accept", "")
    # A browser gets the table; a client naming JSON (a test's "browser" reading what
    # arrived, an API client) gets the document.
    if "text/html" in accept and "application/json" not in accept:
        return web.Response(
            text=_page(doc, headers),
            content_type="text/html",
            headers={
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-store",
            },
        )
    return web.json_response(doc)


_STYLE = (
    "body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:60rem;"
    "padding:0 1rem;color:#1d2330}h1{font-size:1.3rem}table{border-collapse:collapse;"
    "width:100%}th,td{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #e3e5ea;"
    "vertical-align:top}td{font-family:ui-monospace,monospace;word-break:break-all}"
    "tr.stepup{background:#eef4ff}tr.stepup th{color:#1d4ed8}"
    "p.note{color:#5b6272;font-size:.9rem}"
)


def _page(doc: dict[str, object], headers: dict[str, str]) -> str:
    """The request as a browser page: the stepup-authz headers first, highlighted."""
    order = sorted(headers, key=lambda k: (not k.startswith("x-stepup-"), k))
    rows = "".join(
        f"<tr{' class=stepup' if k.startswith('x-stepup-') else ''}>"
        f"<th>{escape(k)}</th><td>{escape(headers[k])}</td></tr>"
        for k in order
    )
    query = f"?{doc['query']}" if doc["query"] else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>Echo: {escape(str(doc['path']))}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{escape(str(doc['method']))} <code>{escape(str(doc['path']) + query)}</code></h1>"
        '<p class="note">The demo upstream: the request as it arrived from Envoy. The '
        "<code>x-stepup-*</code> headers (highlighted) were set by stepup-authz.</p>"
        f"<table><thead><tr><th>header</th><th>value</th></tr></thead><tbody>{rows}"
        "</tbody></table></body></html>"
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
