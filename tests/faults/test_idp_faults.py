"""IdP faults: the JWKS endpoint down or slow, the token endpoint failing at the step-up
callback. The IdP is the real dev IdP behind a fault-injecting proxy (tests/ha/harness.py).

Expected safe outcomes:
- JWKS down or slow: keys already loaded keep verifying tokens; a token whose ``kid`` is not
  in them is refused (never allowed); the event loop never blocks while the JWKS is fetched.
- Token endpoint errors, timeouts and dropped connections at the callback: a 403 page, no
  grant (the retried request is still a step-up), counted in ``stepup_completions_total``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.builders import (
    async_wait_until,
    check_request,
    idp_sign_in,
    rsa_key,
    sign,
    token_claims,
)
from tests.ha.harness import SENSITIVE, STANDARD, Env, service_env

pytestmark = pytest.mark.integration


@pytest.fixture
async def env(redis_url: str, redis_prefix: str, tmp_path: Path) -> AsyncIterator[Env]:
    extra = {
        "oidc": {"jwks_refresh_min_interval_s": 0, "jwks_timeout_s": 2.0, "http_timeout_s": 0.5},
        "audit": {"enabled": False},
    }
    # A generous store deadline: these tests are about the IdP, not Redis latency.
    async with service_env(
        tmp_path, {"url": redis_url, "key_prefix": redis_prefix, "deadline_ms": 1000}, extra
    ) as e:
        yield e


def rogue_token(env: Env, kid: str = "rotated-key-we-never-saw") -> str:
    """A well-formed access token signed by a key the IdP never published."""
    now = int(time.time())
    claims = token_claims(now, iss=env.idp, aud="stepup-demo", iat=now, auth_time=now)
    return sign(rsa_key(kid), claims, typ="at+jwt")


async def test_jwks_down_cached_keys_keep_working(env: Env) -> None:
    alice = await env.token("alice")
    env.proxy.modes["/jwks"] = "down"
    fresh = await env.token("bob")  # never seen by the service: a full verification
    assert (await env.check(STANDARD, fresh)).allowed
    assert (await env.check(STANDARD, alice)).allowed
    before = env.proxy.hits["/jwks"]
    r = await env.check(SENSITIVE, rogue_token(env))
    assert (r.allowed, r.status, r.reason) == (False, 401, "token-invalid"), r
    assert env.proxy.hits["/jwks"] == before + 1  # it did try to refresh, and failed
    env.proxy.modes["/jwks"] = "close"
    r = await env.check(SENSITIVE, rogue_token(env))
    assert (r.allowed, r.reason) == (False, "token-invalid"), r
    assert (await env.check(STANDARD, fresh)).allowed


async def test_jwks_slow_never_blocks_the_loop(env: Env) -> None:
    """While an unknown kid makes the service fetch a JWKS the IdP does not answer, the
    Check that asked gets our own keys-unavailable (after jwks_refresh_wait_ms, the
    verifier's own timer) with the fetch still unanswered, other Checks are answered
    meanwhile (the loop is free), and the fetch itself runs to its end once the IdP answers.
    How fast those answers come is for the benchmark, not for this test."""
    alice = await env.token("alice")
    assert (await env.check(STANDARD, alice)).allowed
    env.proxy.modes["/jwks"] = "hold"
    hits, done = env.proxy.hits["/jwks"], env.proxy.done["/jwks"]
    rogue = await env.check(SENSITIVE, rogue_token(env))
    assert (rogue.allowed, rogue.reason) == (False, "keys-unavailable"), rogue
    assert env.proxy.hits["/jwks"] == hits + 1  # the fetch started ...
    during = [await env.check(STANDARD, alice) for _ in range(20)]
    assert all(x.allowed for x in during), during
    assert env.proxy.done["/jwks"] == done  # ... and was in flight all along
    env.proxy.release.set()
    await async_wait_until(lambda: env.proxy.done["/jwks"] == done + 1, "the JWKS fetch")


async def browser_to_callback(env: Env, s: aiohttp.ClientSession, token: str) -> tuple[str, str]:
    """Check -> start -> IdP login with TOTP; returns (callback URL on the service, state
    cookie) without calling the callback."""
    r = await env.stub.Check(_html_check(token))
    start = next(h.header.value for h in r.denied_response.headers if h.header.key == "location")
    async with s.get(
        f"{env.http}{start}", cookies={"stepup-token": token}, allow_redirects=False
    ) as resp:
        assert resp.status == 302, await resp.text()
        authorize = resp.headers["Location"]
        state_cookie = resp.cookies["stepup-state"].value
    cb = urlsplit(await idp_sign_in(s, authorize))
    return f"{env.http}{cb.path}?{cb.query}", state_cookie


def _html_check(token: str) -> Any:
    return check_request(SENSITIVE, {"cookie": f"stepup-token={token}", "accept": "text/html"})


@pytest.mark.parametrize("mode", ["error", "hold", "close", "down"])
async def test_token_endpoint_faults_at_callback(env: Env, mode: str) -> None:
    """Each fault ends in a refusal and no grant. ``hold``: the IdP never answers; the
    callback's answer comes while the token request is still unanswered, so it was the
    service's own oidc.http_timeout_s (0.5 s, a real timer: the subject) that ended it."""
    token = await env.token("alice")
    async with aiohttp.ClientSession() as s:
        callback, cookie = await browser_to_callback(env, s, token)
        rejected = {"level": "elevated", "result": "token-rejected", "factor": "none"}
        before = env.metric("stepup_authz_stepup_completions_total", rejected)
        env.proxy.modes["/token"] = mode
        done = env.proxy.done["/token"]
        async with s.get(callback, cookies={"stepup-state": cookie}, allow_redirects=False) as resp:
            status, body = resp.status, await resp.text()
        if mode == "hold":
            assert env.proxy.done["/token"] == done  # answered before the IdP did
    assert status in (403, 503), body
    assert "Set-Cookie" not in body
    assert env.metric("stepup_authz_stepup_completions_total", rejected) == before + 1
    r = await env.check(SENSITIVE, token)  # no grant was recorded
    assert (r.allowed, r.reason) == (False, "acr-insufficient"), r
