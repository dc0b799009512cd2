"""The step-up flow's own pages: what a user sees when a step-up cannot go on.

Every page says what happened in plain words, gives a reference (the decision id, which
is also in the service log line and the audit record of the same event) and a working
way back: ``Try again`` restarts from the page the user wanted, never a dead end.
Everything interpolated is HTML-escaped; nothing here reads the request.
"""

from __future__ import annotations

from html import escape

from aiohttp import web

_STYLE = (
    "body{font:16px/1.5 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}"
    "main{max-width:34rem;margin:10vh auto;background:#fff;padding:2rem 2.25rem;"
    "border-radius:8px;box-shadow:0 1px 3px #0002}"
    "h1{font-size:1.35rem;margin:0 0 .75rem}p{margin:.5rem 0}"
    ".ref{color:#5b6272;font-size:.85rem;margin-top:1.5rem}"
    "a.button{display:inline-block;margin-top:1rem;padding:.55rem 1.1rem;border-radius:6px;"
    "background:#1d4ed8;color:#fff;text-decoration:none}"
    "a.button:focus{outline:3px solid #93c5fd;outline-offset:2px}"
)


def page(
    status: int,
    title: str,
    detail: str,
    *,
    back: str = "/",
    back_label: str = "Try again",
    reference: str | None = None,
) -> web.Response:
    """An HTML page with ``title``, ``detail``, a way ``back`` and the ``reference`` id."""
    ref = f'<p class="ref">Reference: <code>{escape(reference)}</code></p>' if reference else ""
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f'<body><main role="main"><h1>{escape(title)}</h1><p>{escape(detail)}</p>'
        f'<a class="button" href="{escape(back, quote=True)}">{escape(back_label)}</a>'
        f"{ref}</main></body></html>"
    )
    return web.Response(
        status=status,
        text=body,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )
