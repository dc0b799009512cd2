"""The dev IdP's logout (authz.devidp.logout): a sign-out at /logout posts a logout token to
the client's back-channel URI, and the service's own endpoint (authz.stepup.logout, with
the real verifier and the dev IdP's published keys) accepts it and ends that session."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from authz.audit.testing import MemoryAuditor
from authz.check.tokens import StaticKeySource, TokenVerifier
from authz.config.settings import OidcSettings, Settings, StepupSettings
from authz.core.session import Evidence, Grant, session_key, user_key
from authz.devidp import DevClient, DevIdpConfig, base_url, bind, running
from authz.stepup.logout import LogoutApp
from authz.stepup.oidc import ProviderMetadata
from authz.store.memory import MemorySessionStore
from tests.builders import FakeClock, FakeTokens
from tests.integration.test_devidp import (
    CLIENT_ID,
    CLIENT_SECRET,
    REDIRECT_URI,
    Idp,
    exchange,
    login,
    pkce,
)

pytestmark = pytest.mark.integration

AFTER = "http://127.0.0.1:8080/signed-out"


@dataclass
class Env:
    idp: Idp
    store: MemorySessionStore
    auditor: MemoryAuditor
    received: list[int]  # the service's answers to the dev IdP's POSTs


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    clock = FakeClock(int(time.time()))  # near real time, as test_devidp's
    sock = bind("127.0.0.1", 0)
    url = base_url(sock)
    store, auditor, received = MemorySessionStore(clock), MemoryAuditor(), []
    service: dict[str, LogoutApp] = {}

    async def backchannel(request: web.Request) -> web.StreamResponse:
        resp = await service["app"].backchannel(request)
        received.append(resp.status)
        return resp

    receiver = web.Application()
    receiver.router.add_post("/_stepup/backchannel-logout", backchannel)
    async with TestServer(receiver, host="127.0.0.1") as server:
        config = DevIdpConfig(
            issuer=url,
            clients={
                CLIENT_ID: DevClient(
                    CLIENT_SECRET,
                    (REDIRECT_URI,),
                    backchannel_logout_uri=str(server.make_url("/_stepup/backchannel-logout")),
                    post_logout_redirect_uris=(AFTER,),
                )
            },
            clock=clock,
        )
        async with (
            running(config, sock),
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
        ):
            async with http.get(f"{url}/jwks") as resp:
                keys = await resp.json()
            policy = tmp_path / "policy.yaml"
            policy.write_text("levels: {standard: {}}\ndefault_level: standard\n")
            oidc = OidcSettings(issuer=url, client_id=CLIENT_ID, audience="stepup-demo")
            settings = Settings(policy_file=policy, oidc=oidc, stepup=StepupSettings())
            service["app"] = LogoutApp(
                settings=settings,
                logout_tokens=TokenVerifier(oidc, StaticKeySource(keys)),
                access_tokens=FakeTokens(),
                store=store,
                metadata=ProviderMetadata(url, f"{url}/authorize", f"{url}/token"),
                auditor=auditor,
                clock=clock,
            )
            yield Env(Idp(url, clock, http), store, auditor, received)


async def signed_in(env: Env) -> str:
    """Sign in at the dev IdP; a grant for that session is in the store. Returns the sid."""
    verifier, challenge = pkce()
    query = await login(env.idp, (verifier, challenge))
    resp = await exchange(env.idp, query["code"], verifier)
    tokens: dict[str, Any] = await resp.json()
    sid = str(jwt.decode(tokens["access_token"], options={"verify_signature": False})["sid"])
    now = int(env.idp.clock())
    g = Grant("elevated", Evidence("mfa", ("pwd", "otp"), now), now + 900, now)
    await env.store.write_grant(
        user_key(env.idp.url, "alice"), session_key(env.idp.url, "alice", sid), g, now
    )
    return sid


async def grants(env: Env, sid: str) -> tuple[Grant, ...]:
    state = await env.store.read_check(
        user=user_key(env.idp.url, "alice"),
        session=session_key(env.idp.url, "alice", sid),
        levels=("elevated",),
        level="elevated",
        device=None,
        ip=None,
        sensitive=False,
        window_s=60,
        now=int(env.idp.clock()),
    )
    return state.grants


async def test_signing_out_at_the_dev_idp_ends_the_session_at_the_service(env: Env) -> None:
    sid = await signed_in(env)
    async with env.idp.http.get(f"{env.idp.url}/logout", allow_redirects=False) as resp:
        assert resp.status == 200 and 'method="post"' in await resp.text()
    assert env.received == [] and len(await grants(env, sid)) == 1  # a GET ends nothing

    form = {"client_id": CLIENT_ID, "post_logout_redirect_uri": AFTER}
    async with env.idp.http.post(f"{env.idp.url}/logout", data=form, allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == AFTER
    assert env.received == [200]
    assert await grants(env, sid) == ()
    (event,) = env.auditor.events
    assert (event.outcome, event.details["via"], event.session) == (
        "success",
        "back-channel",
        session_key(env.idp.url, "alice", sid),
    )


async def test_an_unregistered_return_address_is_not_followed(env: Env) -> None:
    await signed_in(env)
    form = {"client_id": CLIENT_ID, "post_logout_redirect_uri": "https://evil.example/"}
    async with env.idp.http.post(f"{env.idp.url}/logout", data=form, allow_redirects=False) as resp:
        assert resp.status == 200 and "Signed out" in await resp.text()


async def test_discovery_names_the_logout_endpoints(env: Env) -> None:
    async with env.idp.http.get(f"{env.idp.url}/.well-known/openid-configuration") as resp:
        meta = await resp.json()
    assert meta["end_session_endpoint"] == f"{env.idp.url}/logout"
    assert meta["backchannel_logout_supported"] is True
