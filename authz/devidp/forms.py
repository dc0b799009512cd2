"""HTML pages of the development OIDC provider: the login form and the error page.

Every interpolated value goes through ``html.escape``; the pages load nothing external.
"""

from __future__ import annotations

from html import escape

from aiohttp import web

# The pages need only inline styles; forbid everything else, and framing (clickjacking).
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:26rem;margin:3rem auto;padding:0 1rem}}
label{{display:block;margin:.8rem 0 .2rem}} input{{width:100%;padding:.4rem}}
button{{margin-top:1rem;padding:.5rem 1.2rem}} .error{{color:#b00020}}
.banner{{background:#fff3cd;padding:.4rem;font-size:.85rem}} .why{{color:#374151}}
</style></head>
<body><p class="banner">Development identity provider &mdash; not for production use.</p>
<h1>{title}</h1>
{body}
</body></html>
"""


def _page(title: str, body: str, status: int) -> web.Response:
    text = _PAGE.format(title=escape(title), body=body)
    return web.Response(
        text=text, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS
    )


def login_form(
    *,
    request_id: str,
    client_id: str,
    username: str,
    need_otp: bool,
    why: str = "",
    error: str = "",
    status: int = 200,
) -> web.Response:
    """The sign-in form. The pending authorization request is referenced only by its opaque
    ``request_id``; redirect URI, PKCE challenge and the rest stay on the server."""
    error_html = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    otp_html = (
        '<label for="otp">Authenticator code</label>'
        '<input id="otp" name="otp" inputmode="numeric" autocomplete="one-time-code" '
        'pattern="[0-9]{6}" required>'
        if need_otp
        else ""
    )
    why_html = f'<p class="why">{escape(why)}</p>' if why else ""
    body = f"""<p>Sign in to continue to <strong>{escape(client_id)}</strong>.</p>
{why_html}{error_html}
<form method="post" action="authorize">
<input type="hidden" name="request_id" value="{escape(request_id)}">
<label for="username">Username</label>
<input id="username" name="username" value="{escape(username)}" autocomplete="username" required>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
{otp_html}
<button type="submit">Sign in</button>
<button type="submit" name="action" value="cancel" formnovalidate>Cancel</button>
</form>"""
    return _page("Sign in", body, status)


def second_factor_form(
    *,
    request_id: str,
    client_id: str,
    username: str,
    why: str,
    error: str = "",
    status: int = 200,
) -> web.Response:
    """The step-up of the user already signed in here: the authenticator code only."""
    error_html = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    body = f"""<p><strong>{escape(client_id)}</strong> asks you to confirm it is you.</p>
<p class="why">{escape(why)}</p>
{error_html}
<form method="post" action="authorize">
<input type="hidden" name="request_id" value="{escape(request_id)}">
<p>Signed in as <strong>{escape(username)}</strong></p>
<label for="otp">Authenticator code</label>
<input id="otp" name="otp" inputmode="numeric" autocomplete="one-time-code"
 pattern="[0-9]{{6}}" required autofocus>
<button type="submit">Confirm</button>
</form>"""
    return _page("Confirm with your second factor", body, status)


def error_page(message: str, *, status: int = 400) -> web.Response:
    """Shown instead of redirecting when the client or redirect URI cannot be trusted
    (RFC 6749 section 4.1.2.1: never redirect to an unverified URI)."""
    return _page("Sign-in error", f'<p class="error">{escape(message)}</p>', status)
