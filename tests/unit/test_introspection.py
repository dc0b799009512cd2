"""RFC 7662 introspection client against a scripted endpoint on 127.0.0.1 (port 0).

The real IdP's introspection (oidc-provider) is exercised in tests/interop; here each
answer the client must refuse or survive is produced on purpose.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from authz.check.introspection import AccessTokens, Introspector, build_access_tokens
from authz.check.tokens import StaticKeySource, TokenVerifier
from authz.config.settings import OidcSettings
from authz.errors import IntrospectionUnavailable, TokenError

ISS = "https://idp.example.com"
NOW = 1_700_000_000
OPAQUE = "x80gARv50283y0aIbA4K4PGoOo6FUC"


@dataclass
class Endpoint:
    answer: Any = None
    status: int = 200
    hold: asyncio.Event | None = None
    seen: list[dict[str, Any]] = field(default_factory=list)
    base: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        form = dict(await request.post())
        self.seen.append({"form": form, "auth": request.headers.get("Authorization")})
        if self.hold is not None:
            await self.hold.wait()
        if isinstance(self.answer, bytes):
            return web.Response(status=self.status, body=self.answer)
        return web.json_response(self.answer, status=self.status)


def active(**over: Any) -> dict[str, Any]:
    doc = {
        "active": True,
        "iss": ISS,
        "sub": "alice",
        "aud": "api",
        "client_id": "desk",
        "exp": NOW + 300,
        "iat": NOW - 10,
        "sid": "s-1",
        "acr": "mfa",
        "amr": ["pwd", "otp"],
        "auth_time": NOW - 20,
        "token_type": "Bearer",
    }
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    state = Endpoint(answer=active())
    app = web.Application()
    app.router.add_post("/introspect", state.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.base = f"http://{host}:{port}"
    yield state
    if state.hold is not None:
        state.hold.set()
    await runner.cleanup()


def oidc(**intro: Any) -> OidcSettings:
    top = {k: intro.pop(k) for k in ("allowed_clients", "profile") if k in intro}
    return OidcSettings(
        issuer=ISS,
        client_id="stepup-authz",
        client_secret="s3cret/+",
        audience="api",
        introspection={"endpoint": "https://unused.example/introspect", **intro},
        **top,
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def introspector(endpoint: Endpoint, http: aiohttp.ClientSession, **intro: Any) -> Introspector:
    s = oidc(**intro)
    jwt = TokenVerifier(s, StaticKeySource({"keys": []}))
    return Introspector(s, jwt, http, endpoint=endpoint.base + "/introspect")


async def refused(i: Introspector, match: str, token: str = OPAQUE, now: int = NOW) -> None:
    with pytest.raises(TokenError, match=match) as ei:
        await i.verify_access_token(token, now)
    assert token not in str(ei.value)


async def test_active_token_gives_the_same_identity_as_a_jwt(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    i = introspector(endpoint, http)
    ident = await i.verify_access_token(OPAQUE, NOW)
    assert (ident.issuer, ident.subject, ident.session_id, ident.client_id) == (
        ISS,
        "alice",
        "s-1",
        "desk",
    )
    assert (ident.evidence.acr, ident.evidence.amr, ident.evidence.auth_time) == (
        "mfa",
        ("pwd", "otp"),
        NOW - 20,
    )
    assert (ident.expires_at, ident.issued_at) == (NOW + 300, NOW - 10)
    (call,) = endpoint.seen
    assert call["form"] == {"token": OPAQUE, "token_type_hint": "access_token"}
    pair = base64.b64decode(call["auth"].removeprefix("Basic ")).decode()
    assert pair == "stepup-authz:s3cret%2F%2B"  # RFC 6749 2.3.1: form-encoded, then Basic


async def test_client_secret_post_and_own_credentials(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    i = introspector(
        endpoint, http, auth_method="client_secret_post", client_id="rs", client_secret="x"
    )
    await i.verify_access_token(OPAQUE, NOW)
    (call,) = endpoint.seen
    assert call["auth"] is None
    assert call["form"]["client_id"] == "rs" and call["form"]["client_secret"] == "x"


async def test_cache_bounded_by_exp_and_ttl(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    i = introspector(endpoint, http, cache_ttl_s=60)
    await i.verify_access_token(OPAQUE, NOW)
    await i.verify_access_token(OPAQUE, NOW + 59)
    assert i.calls == 1
    endpoint.answer = active(exp=NOW + 70)
    await i.verify_access_token(OPAQUE, NOW + 60)  # TTL over: asked again
    assert i.calls == 2
    await i.verify_access_token(OPAQUE, NOW + 69)  # cached until min(exp, now + 60)
    assert i.calls == 2
    endpoint.answer = {"active": False}
    await refused(i, "not active", now=NOW + 70)  # exp reached: asked again, now revoked
    assert i.calls == 3


async def test_cache_is_bounded(endpoint: Endpoint, http: aiohttp.ClientSession) -> None:
    i = introspector(endpoint, http, cache_size=2)
    for t in ("tok-a", "tok-b", "tok-c", "tok-a"):
        await i.verify_access_token(t, NOW)
    assert i.calls == 4  # tok-a was evicted by tok-c
    assert len(i._cache) == 2


async def test_inactive_cached_briefly(endpoint: Endpoint, http: aiohttp.ClientSession) -> None:
    endpoint.answer = {"active": False}
    i = introspector(endpoint, http, negative_cache_ttl_s=5)
    await refused(i, "not active")
    await refused(i, "not active", now=NOW + 4)
    assert i.calls == 1
    endpoint.answer = active()
    assert await i.verify_access_token(OPAQUE, NOW + 5)
    assert i.calls == 2


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (active(iss="https://evil.example"), "iss"),
        (active(aud="other-api"), "aud"),
        (active(aud=None), "aud"),
        (active(aud=["x", 1]), "aud"),
        (active(token_type=None), "Bearer"),  # a refresh token introspects without one
        (active(token_type="refresh_token"), "Bearer"),
        (active(cnf={"jkt": "abc"}), "cnf"),
        (active(exp=None), "exp"),
        (active(exp="1"), "exp"),
        (active(exp=NOW - 31), "expired"),
        (active(nbf=NOW + 31), "nbf"),
        (active(iat=NOW + 31), "iat"),
        (active(sub=None), "sub"),
        (active(sub="a\r\nb"), "control"),
        (active(amr="pwd"), "amr"),
        (active(auth_time="now"), "auth_time"),
    ],
)
async def test_active_answers_refused(
    endpoint: Endpoint, http: aiohttp.ClientSession, answer: Any, match: str
) -> None:
    endpoint.answer = answer
    await refused(introspector(endpoint, http, cache_size=0), match)


async def test_no_aud_accepted_only_with_a_client_allowlist(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(ValueError, match="allowed_clients"):
        oidc(require_audience=False)
    endpoint.answer = active(aud=None)
    i = introspector(endpoint, http, require_audience=False, allowed_clients=["desk"])
    assert (await i.verify_access_token(OPAQUE, NOW)).client_id == "desk"
    endpoint.answer = active(aud=None, client_id="other")
    await refused(
        introspector(endpoint, http, require_audience=False, allowed_clients=["desk"]),
        "allowed_clients",
    )


@pytest.mark.parametrize(
    ("status", "answer", "match"),
    [
        (500, {"error": "server_error"}, "HTTP 500"),
        (401, {"error": "invalid_client"}, "HTTP 401"),
        (400, {"error": "unsupported_token_type"}, "HTTP 400"),
        (302, {}, "HTTP 302"),
        (200, b"not json", "JSON"),
        (200, b'{"active": true, "active": false}', "JSON"),  # duplicate member
        (200, {"active": "true"}, "boolean"),
        (200, [1], "JSON"),
        (200, b"{" + b'"a":"' + b"x" * 70_000 + b'"}', "too large"),
    ],
)
async def test_endpoint_failures_fail_closed(
    endpoint: Endpoint, http: aiohttp.ClientSession, status: int, answer: Any, match: str
) -> None:
    endpoint.status, endpoint.answer = status, answer
    i = introspector(endpoint, http)
    with pytest.raises(IntrospectionUnavailable, match=match) as ei:
        await i.verify_access_token(OPAQUE, NOW)
    assert ei.value.reason == "keys-unavailable"
    assert not i._cache  # a failure is never cached


async def test_deadline_and_shared_calls(endpoint: Endpoint, http: aiohttp.ClientSession) -> None:
    # The subject is the client's own deadline timer (timeout_ms), so a real timer runs.
    endpoint.hold = asyncio.Event()
    i = introspector(endpoint, http, timeout_ms=50)
    results = await asyncio.gather(
        *(i.verify_access_token(OPAQUE, NOW) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, IntrospectionUnavailable) for r in results)
    assert "timed out" in str(results[0])
    assert i.calls == 1  # five checks of one token: one call


async def test_max_inflight_fails_closed_without_queueing(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    endpoint.hold = asyncio.Event()
    i = introspector(endpoint, http, max_inflight=2, timeout_ms=5000)
    first = [asyncio.create_task(i.verify_access_token(f"t-{n}", NOW)) for n in range(2)]
    await asyncio.sleep(0)  # one turn of the loop: both checks register their call
    with pytest.raises(IntrospectionUnavailable, match="in flight"):
        await i.verify_access_token("t-3", NOW)
    endpoint.hold.set()
    assert all(r.subject == "alice" for r in await asyncio.gather(*first))


@pytest.mark.parametrize("token", ["", "a b", "tok\n", "x" * 9000, "ä"])
async def test_malformed_tokens_never_reach_the_idp(
    endpoint: Endpoint, http: aiohttp.ClientSession, token: str
) -> None:
    i = introspector(endpoint, http)
    with pytest.raises(TokenError):
        await i.verify_access_token(token, NOW)
    assert i.calls == 0


async def test_access_tokens_routes_jwts_and_opaque_tokens(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    i = introspector(endpoint, http)
    both = AccessTokens(i._verifier, i)
    assert (await both.verify_access_token(OPAQUE, NOW)).subject == "alice"
    with pytest.raises(TokenError, match="verification keys"):  # a JWS goes to the verifier
        await both.verify_access_token("eyJhbGciOiJSUzI1NiJ9.e30.c2ln", NOW)
    assert i.calls == 1
    alone = await build_access_tokens(
        OidcSettings(issuer=ISS, client_id="c", audience="api"), i._verifier, http
    )
    assert alone.introspector is None
    with pytest.raises(TokenError, match="compact"):
        await alone.verify_access_token(OPAQUE, NOW)


async def test_before_discovery_names_the_endpoint_an_opaque_token_is_unavailable(
    endpoint: Endpoint, http: aiohttp.ClientSession
) -> None:
    """Introspection configured, its endpoint still to come from discovery (the service
    started with the IdP down): an opaque token is the IdP being unavailable (fail closed,
    retried), never a JWT verification; once set, it is introspected."""
    i = introspector(endpoint, http)
    pending = AccessTokens(i._verifier, None, pending=True)
    assert pending.pending
    with pytest.raises(IntrospectionUnavailable, match="not known yet"):
        await pending.verify_access_token(OPAQUE, NOW)
    with pytest.raises(TokenError, match="verification keys"):  # a JWS still goes to the JWTs
        await pending.verify_access_token("eyJhbGciOiJSUzI1NiJ9.e30.c2ln", NOW)
    assert i.calls == 0
    pending.set_introspector(i)
    assert not pending.pending
    assert (await pending.verify_access_token(OPAQUE, NOW)).subject == "alice"
    assert i.calls == 1
