"""Clients for the adversarial suite: a raw HTTP/1.1 client (so the bytes reach Envoy exactly
as written: no client-side path normalisation, header folding or UTF-8 checks), a browser
that keeps cookies and follows nothing by itself, token minting with the IdP's own key, and
the policy's view of a path as the upstream received it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
import pyotp

from authz.config.policy_file import read_policy
from authz.core.attributes import canonicalize_path
from authz.core.policy import Policy
from authz.demo.stack import AUDIENCE, CLIENT_ID, Stack
from authz.errors import RequestError
from tests.builders import TOTP_SECRETS, Key, b64, sign, token_claims

POLICY_FILE = Path(__file__).with_name("policy.yaml")
# A browser's Accept (the Check redirects it), naming JSON too so that the echo upstream
# answers what it received as data rather than its HTML table.
BROWSER_HEADERS = {"Accept": "text/html,application/xhtml+xml,application/json;q=0.9"}
APP_ORIGIN = "https://app.example"  # what a browser would resolve a Location against


def policy() -> Policy:
    return read_policy(POLICY_FILE).policy


# -- raw HTTP/1.1 --------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def reason(self) -> str | None:
        return self.header("x-stepup-reason")

    def echo(self) -> dict[str, Any] | None:
        """The echo upstream's view of the request (None when the upstream was not reached)."""
        if self.status != 200 or self.header("content-type") != "application/json; charset=utf-8":
            return None
        doc = json.loads(self.body)
        return doc if isinstance(doc, dict) and "headers" in doc else None

    def __str__(self) -> str:
        return f"{self.status} {self.reason or ''}".strip()


async def raw_request(
    port: int,
    method: str | bytes,
    target: str | bytes,
    headers: list[tuple[str | bytes, str | bytes]] | None = None,
    *,
    host: str | bytes | None = "app.example",
    body: bytes = b"",
    wait_s: float = 10.0,
) -> RawResponse:
    """Send one request over a fresh connection, exactly as given, and read the answer.
    A connection Envoy closes or resets without answering gives status 0."""

    def b(x: str | bytes) -> bytes:
        return x if isinstance(x, bytes) else x.encode("latin-1")

    lines = [b(method) + b" " + b(target) + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + b(host))
    for k, v in headers or []:
        lines.append(b(k) + b": " + b(v))
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    wire = b"\r\n".join(lines) + b"\r\n\r\n" + body
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    raw = b""
    try:
        writer.write(wire)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), wait_s)
    except ConnectionError:
        # Envoy answered early (e.g. 431) and closed while we were still writing: read
        # whatever it sent before the reset.
        with contextlib.suppress(ConnectionError, OSError):
            raw = await asyncio.wait_for(reader.read(), 1.0)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return parse_response(raw)


def parse_response(raw: bytes) -> RawResponse:
    if not raw:
        return RawResponse(0, [], b"")  # closed without an answer
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    resp = RawResponse(status, headers, body)
    if (resp.header("transfer-encoding") or "").lower() == "chunked":
        resp.body = _dechunk(body)
    return resp


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


# -- tokens --------------------------------------------------------------------------------


@dataclass
class Minter:
    """Tokens as the dev IdP would sign them (its private key, its kid), with any change:
    ``tests.builders.sign`` over this IdP's claims, typed ``at+jwt``."""

    private_key: Any
    kid: str
    issuer: str
    audience: str = AUDIENCE

    def claims(self, now: int | None = None, **over: Any) -> dict[str, Any]:
        """Now (the stack's real clock unless given), with a fresh sid and jti."""
        now = int(time.time()) if now is None else now
        mine = {"iss": self.issuer, "aud": self.audience, "iat": now, "exp": now + 600}
        mine |= {"auth_time": now, "client_id": CLIENT_ID}
        fresh = {"sid": secrets.token_urlsafe(8), "jti": secrets.token_urlsafe(8)}
        return token_claims(now, **{**mine, **fresh, **over})

    def sign(
        self,
        claims: dict[str, Any] | None = None,
        *,
        key: Any = None,
        alg: str = "RS256",
        raw_payload: bytes | None = None,
        **header: Any,
    ) -> str:
        """A compact JWS over ``claims`` (or exact payload bytes) under this IdP's kid,
        signed with ``key`` (the IdP's own by default) and the header changes."""
        signer = Key(self.kid, key if key is not None else self.private_key, alg)
        payload = raw_payload if raw_payload is not None else claims
        if payload is None:
            payload = self.claims()
        return sign(signer, payload, **{"typ": "at+jwt", **header})

    def token(self, **claims: Any) -> str:
        return self.sign(self.claims(**claims))


def forge(header: dict[str, Any], payload: dict[str, Any] | bytes, sig: bytes = b"") -> str:
    """An unsigned (or arbitrarily "signed") token: header and payload exactly as given."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return ".".join([b64(json.dumps(header).encode()), b64(body), b64(sig)])


# -- HTTP clients --------------------------------------------------------------------------


async def set_knobs(stack: Stack, **knobs: Any) -> None:
    """TEST-ONLY dev IdP misbehaviour (authz.devidp.misbehave); no knobs = honest again."""
    async with (
        aiohttp.ClientSession() as s,
        s.put(f"{stack.idp_url}/_test/misbehave", json=knobs) as r,
    ):
        assert r.status == 200, await r.text()


@dataclass
class Hop:
    status: int
    headers: dict[str, str]
    body: str

    @property
    def location(self) -> str:
        return self.headers.get("Location", "")


@dataclass
class Browser:
    """A cookie-keeping client that follows nothing by itself, so each hop is asserted."""

    session: aiohttp.ClientSession
    stack: Stack
    user: str = "alice"
    history: list[str] = field(default_factory=list)

    async def get(self, url: str, **kw: Any) -> Hop:
        if url.startswith("/"):
            url = self.stack.envoy_url + url
        headers = {**BROWSER_HEADERS, **kw.pop("headers", {})}
        async with self.session.get(url, headers=headers, allow_redirects=False, **kw) as r:
            return Hop(r.status, dict(r.headers), await r.text())

    async def post(self, url: str, data: dict[str, str]) -> Hop:
        async with self.session.post(
            url, data=data, headers=BROWSER_HEADERS, allow_redirects=False
        ) as r:
            return Hop(r.status, dict(r.headers), await r.text())

    async def idp_login(self, authorize_url: str, *, otp: bool, user: str | None = None) -> str:
        """Answer the IdP's form; return the callback URL it redirects to."""
        user = user or self.user
        hop = await self.get(authorize_url)
        if hop.status == 302:  # SSO session still good enough
            return hop.location
        assert hop.status == 200, hop.body
        m = re.search(r'name="request_id" value="([^"]+)"', hop.body)
        assert m is not None, hop.body
        form = {"request_id": m.group(1), "username": user, "password": f"{user}-password"}
        if otp:
            form["otp"] = pyotp.TOTP(TOTP_SECRETS[user]).now()
        hop = await self.post(authorize_url.split("?")[0], form)
        assert hop.status == 302, hop.body
        return hop.location

    async def sign_in(self, path: str = "/accounts/1") -> None:
        """The login round trip: app -> /_stepup/login -> IdP (password) -> callback."""
        hop = await self.get(path)
        assert hop.status == 302 and hop.location.startswith("/_stepup/login?rd="), hop
        hop = await self.get(hop.location)
        assert hop.status == 302, hop
        callback = await self.idp_login(hop.location, otp=False)
        hop = await self.get(callback)
        assert hop.status == 303, hop

    async def begin_step_up(self, path: str) -> str:
        """app 302 -> /_stepup/start -> the IdP's authorize URL (state cookie now set)."""
        hop = await self.get(path)
        assert hop.status == 302 and hop.location.startswith("/_stepup/start?level="), hop
        hop = await self.get(hop.location)
        assert hop.status == 302, hop
        return hop.location

    async def step_up_callback(self, path: str, *, user: str | None = None) -> str:
        """Run the step-up until the IdP redirects back; return the callback URL (unused)."""
        authorize = await self.begin_step_up(path)
        return await self.idp_login(authorize, otp=True, user=user)

    def cookie(self, name: str) -> str | None:
        for c in self.session.cookie_jar:
            if c.key == name:
                return c.value
        return None


# -- what the upstream saw -----------------------------------------------------------------


def servlet_view(raw_path: str) -> str:
    """How a servlet container (Tomcat, Jetty) maps a path: ';' parameters are dropped from
    every segment before dot segments are resolved and the path is decoded."""
    segments = [seg.split(";", 1)[0] for seg in raw_path.split("?", 1)[0].split("/")]
    out: list[str] = []
    for seg in [unquote(s) for s in segments]:
        if seg == "..":
            if out:
                out.pop()
        elif seg not in (".", ""):
            out.append(seg)
    trailing = raw_path.split("?", 1)[0].endswith(("/", "/.", "/..", ";"))
    return "/" + "/".join(out) + ("/" if trailing and out else "")


def upstream_rank(p: Policy, host: str, method: str, raw_path: str) -> int:
    """The strictest level the policy gives any reasonable upstream reading of ``raw_path``
    (as received, its RFC 3986 canonical form, and a servlet container's view)."""
    views = {raw_path.split("?", 1)[0], servlet_view(raw_path)}
    with contextlib.suppress(RequestError):
        views.add(canonicalize_path(raw_path)[0])
    ranks = []
    for view in views:
        route = p.route_for(host, method, view)
        ranks.append((route.level if route is not None else p.default_level).rank)
    return max(ranks)


def same_origin(location: str) -> bool:
    """Whether a browser would stay on the app's origin following ``location``."""
    if not location.startswith("/") or location.startswith(("//", "/\\")):
        return False
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in location):
        return False
    # Browsers treat '\' as '/' and strip tab/newline inside URLs; check both readings.
    for form in (location, location.replace("\\", "/")):
        parts = urlsplit(urljoin(APP_ORIGIN + "/", form))
        if f"{parts.scheme}://{parts.netloc}" != APP_ORIGIN:
            return False
    return True
