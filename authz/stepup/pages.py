"""The step-up flow's own pages: what a user sees when a step-up cannot go on.

Every page says what happened in plain words, gives a reference (the decision id, which
is also in the service log line and the audit record of the same event) and a working
way back: ``Try again`` restarts from the page the user wanted, never a dead end.
Everything interpolated is HTML-escaped; nothing here reads the request.
"""

from __future__ import annotations

from html import escape

from aiohttp import web

from authz.core.policy import Level, Route
from authz.core.reasons import Reason

_STYLE = (
    "body{font:16px/1.5 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}"
    "main{max-width:34rem;margin:10vh auto;background:#fff;padding:2rem 2.25rem;"
    "border-radius:8px;box-shadow:0 1px 3px #0002}"
    "h1{font-size:1.35rem;margin:0 0 .75rem}p{margin:.5rem 0}"
    ".ref{color:#5b6272;font-size:.85rem;margin-top:1.5rem}"
    "a.button{display:inline-block;margin-top:1rem;padding:.55rem 1.1rem;border-radius:6px;"
    "background:#1d4ed8;color:#fff;text-decoration:none}"
    "a.button:focus{outline:3px solid #93c5fd;outline-offset:2px}"
    ".why{color:#374151}a.home{margin-left:1rem;color:#1d4ed8}"
)
# The pages need only their inline style: nothing loads, nothing frames them.
HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'",
}


def why_text(level: Level | None, route: Route | None) -> str:
    """Why a second factor is asked, in the policy's own words: the route's and the
    level's titles and descriptions; plain defaults where the policy has none."""
    if level is None:
        return ""
    asks = level.description or _default_description(level)
    where = f"\u201c{route.title}\u201d" if route is not None and route.title else "This page"
    text = f"{where} asks for {level.label}: {asks}."
    if route is not None and route.description:
        text += f" {route.description}"
    return text


def _default_description(level: Level) -> str:
    parts = ["a stronger sign-in than a password alone" if level.acr else "a fresh sign-in"]
    if level.max_age is not None:
        parts.append(f"within the last {_duration(level.max_age)}")
    return ", ".join(parts)


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0 and seconds >= 3600:
        n, unit = seconds // 3600, "hour"
    elif seconds % 60 == 0 and seconds >= 60:
        n, unit = seconds // 60, "minute"
    else:
        n, unit = seconds, "second"
    return f"{n} {unit}{'s' if n != 1 else ''}"


def render(
    title: str,
    detail: str,
    *,
    back: str = "/",
    back_label: str = "Try again",
    reference: str | None = None,
    why: str = "",
    home: str | None = None,
) -> str:
    """The page's HTML: ``title``, ``detail``, ``why`` (a second paragraph), a way
    ``back`` (and to ``home`` when that is another page), and the ``reference`` id."""
    ref = f'<p class="ref">Reference: <code>{escape(reference)}</code></p>' if reference else ""
    why_html = f'<p class="why">{escape(why)}</p>' if why else ""
    home_html = (
        f'<a class="home" href="{escape(home, quote=True)}">Go to the start page</a>'
        if home is not None and home != back
        else ""
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f'<body><main role="main"><h1>{escape(title)}</h1><p>{escape(detail)}</p>{why_html}'
        f'<a class="button" href="{escape(back, quote=True)}">{escape(back_label)}</a>'
        f"{home_html}{ref}</main></body></html>"
    )


def page(
    status: int,
    title: str,
    detail: str,
    *,
    back: str = "/",
    back_label: str = "Try again",
    reference: str | None = None,
    why: str = "",
    home: str | None = None,
) -> web.Response:
    """An HTML page with ``title``, ``detail``, a way ``back`` and the ``reference`` id."""
    body = render(
        title,
        detail,
        back=back,
        back_label=back_label,
        reference=reference,
        why=why,
        home=home,
    )
    return web.Response(
        status=status,
        text=body,
        content_type="text/html",
        headers=HEADERS,
    )


# -- the Check's refusals, for browsers (authz.check.response) ----------------------------

# Keyed by the Check's reasons, and by reasons a policy rule may name (ip-blocked in the
# examples).
_DENIAL_TEXT: dict[str, tuple[str, str]] = {
    Reason.SESSION_REVOKED: (
        "Signed out",
        "This sign-in was ended (signed out elsewhere or by an administrator). Sign in again.",
    ),
    Reason.IP_NOT_ALLOWED: (
        "Not from this network",
        "This page can be opened only from an approved network.",
    ),
    "ip-blocked": ("Not from this network", "Requests from your network are not allowed here."),
    Reason.GRANT_BOUND_ELSEWHERE: (
        "Confirm again on this device",
        "Your second factor was confirmed on another device or network; confirm it here.",
    ),
    Reason.BAD_PATH: ("Address not accepted", "The address of this page could not be read."),
    Reason.BAD_REQUEST: ("Request not accepted", "This request could not be read."),
}


def denial_page(
    status: int,
    reason: str,
    decision_id: str,
    *,
    back: str,
    unavailable: bool,
    level: Level | None = None,
) -> str:
    """What a browser sees when the Check refuses a request it does not redirect (a 403,
    an error, a step-up on a POST): the reason in words, why the level asks for more when
    it does, the decision id, and a way back to the same page (``back``, already a
    same-origin path)."""
    if unavailable:
        title, detail = (
            "Temporarily unavailable",
            "Access could not be checked just now. Try again in a moment.",
        )
    elif status == 401:
        title, detail = (
            "Sign-in needed",
            "This action needs a (stronger) sign-in. Open the page again to sign in, then "
            "repeat what you were doing.",
        )
    else:
        title, detail = _DENIAL_TEXT.get(
            reason, ("Access refused", "This page cannot be opened with your current sign-in.")
        )
    return render(
        title,
        detail,
        back=back,
        reference=decision_id,
        why=why_text(level, None) if status == 401 else "",
        home="/",
    )
