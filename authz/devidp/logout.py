"""The dev IdP's logout: RP-Initiated Logout 1.0 at ``/logout`` and OIDC Back-Channel
Logout 1.0 to every client that registered a ``backchannel_logout_uri``.

``GET /logout`` shows a confirmation (a link or an image ends nothing); ``POST /logout``
ends the SSO session, signs a logout token per client (``sub``, ``sid``, the back-channel
logout event, a fresh ``jti``, two minutes to live, ``typ: logout+jwt``) and POSTs it, then
sends the browser to a registered ``post_logout_redirect_uri`` of the named client, or
shows "Signed out". Development only: every client with a URI is told, whether or not it
took part in the session.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from html import escape
from typing import Any

import aiohttp
from aiohttp import web

from authz.devidp.config import DevIdpConfig
from authz.devidp.tokens import Authentication

log = logging.getLogger("authz.devidp")

BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
LOGOUT_TOKEN_TTL_S = 120
_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def _page(title: str, body: str) -> web.Response:
    html = (
        f'<!doctype html><html lang="en"><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<h1>{escape(title)}</h1>{body}</html>"
    )
    return web.Response(text=html, content_type="text/html", headers=_HEADERS)


class Logout:
    """The ``/logout`` endpoint; ``sign`` signs claims with the provider's key."""

    def __init__(
        self,
        config: DevIdpConfig,
        sign: Callable[[dict[str, Any], str], str],
        end_session: Callable[[web.Request], Authentication | None],
        *,
        cookie: str,
    ) -> None:
        self.cookie = cookie
        self.config = config
        self.sign = sign
        self.end_session = end_session

    def _return_to(self, params: Mapping[str, Any]) -> str | None:
        client = self.config.clients.get(str(params.get("client_id", "")))
        uri = params.get("post_logout_redirect_uri")
        if client is None or not isinstance(uri, str):
            return None
        return uri if uri in client.post_logout_redirect_uris else None

    async def confirm(self, request: web.Request) -> web.Response:
        hidden = "".join(
            f'<input type="hidden" name="{name}" value="{escape(value, quote=True)}">'
            for name in ("client_id", "post_logout_redirect_uri")
            if (value := request.query.get(name))
        )
        return _page(
            "Sign out",
            f'<form method="post">{hidden}<button type="submit">Sign out</button></form>',
        )

    async def logout(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        auth = self.end_session(request)
        if auth is not None:
            await self.notify(auth)
        target = self._return_to(form)
        if target is not None:
            resp: web.StreamResponse = web.Response(
                status=303, headers={**_HEADERS, "Location": target}
            )
        else:
            resp = _page("Signed out", "<p>You are signed out.</p>")
        resp.del_cookie(self.cookie, path=self.config.issuer_path)
        return resp

    def logout_token(self, client_id: str, auth: Authentication) -> str:
        now = int(self.config.clock())
        claims = {
            "iss": self.config.issuer,
            "aud": client_id,
            "iat": now,
            "exp": now + LOGOUT_TOKEN_TTL_S,
            "jti": secrets.token_urlsafe(16),
            "sub": auth.user,
            "sid": auth.sid,
            "events": {BACKCHANNEL_EVENT: {}},
        }
        return self.sign(claims, "logout+jwt")

    async def notify(self, auth: Authentication) -> dict[str, int | None]:
        """POST a logout token to each client's back-channel URI; the status per client
        (None: unreachable). A failure is logged and does not stop the sign-out."""
        out: dict[str, int | None] = {}
        async with aiohttp.ClientSession(timeout=_TIMEOUT) as http:
            for client_id, client in self.config.clients.items():
                if client.backchannel_logout_uri is None:
                    continue
                token = self.logout_token(client_id, auth)
                try:
                    async with http.post(
                        client.backchannel_logout_uri, data={"logout_token": token}
                    ) as resp:
                        out[client_id] = resp.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    out[client_id] = None
                    log.warning("back-channel logout to %s failed: %r", client_id, exc)
                    continue
                log.info("back-channel logout client=%s status=%s", client_id, resp.status)
        return out
