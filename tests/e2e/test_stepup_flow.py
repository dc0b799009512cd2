"""End to end through the real Envoy binary: the dev IdP, the service, Valkey and the echo
upstream as real processes. Each test names the DESIGN.md row or issue item it proves."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pyotp
import pytest

from authz.demo.stack import Stack
from authz.devidp import ALICE_TOTP_SECRET
from tests import builders

pytestmark = pytest.mark.e2e

# A browser's Accept (the Check redirects it), naming JSON too so that the echo upstream
# answers what it received as data rather than its HTML table.
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/json;q=0.9"}


class Browser:
    """A cookie-keeping client that follows nothing by itself, so each hop is asserted."""

    def __init__(self, session: aiohttp.ClientSession, stack: Stack) -> None:
        self.s = session
        self.stack = stack

    async def get(self, url: str, **kw: Any) -> tuple[int, dict[str, str], str]:
        if url.startswith("/"):
            url = self.stack.envoy_url + url
        headers = {**BROWSER, **kw.pop("headers", {})}
        async with self.s.get(url, headers=headers, allow_redirects=False, **kw) as r:
            return r.status, dict(r.headers), await r.text()

    async def post(self, url: str, data: dict[str, str]) -> tuple[int, dict[str, str], str]:
        async with self.s.post(url, data=data, headers=BROWSER, allow_redirects=False) as r:
            return r.status, dict(r.headers), await r.text()

    async def idp_login(self, authorize_url: str, *, otp: bool) -> str:
        """Answer the IdP's form; return the callback URL it redirects to."""
        status, headers, page = await self.get(authorize_url)
        if status == 302:  # SSO session still good enough
            return headers["Location"]
        assert status == 200, page
        m = re.search(r'name="request_id" value="([^"]+)"', page)
        assert m is not None, page
        form = {"request_id": m.group(1), "username": "alice", "password": "alice-password"}
        if otp:
            assert 'name="otp"' in page
            form["otp"] = pyotp.TOTP(ALICE_TOTP_SECRET).now()
        status, headers, page = await self.post(authorize_url.split("?")[0], form)
        assert status == 302, page
        return headers["Location"]

    async def sign_in(self, path: str = "/accounts/1") -> None:
        """The login round trip: app -> /_stepup/login -> IdP (password) -> callback."""
        status, headers, _ = await self.get(path)
        assert status == 302 and headers["Location"].startswith("/_stepup/login?rd=")
        status, headers, _ = await self.get(headers["Location"])
        assert status == 302
        callback = await self.idp_login(headers["Location"], otp=False)
        status, headers, _ = await self.get(callback)
        assert status == 303, headers

    async def step_up(self, path: str) -> dict[str, list[str]]:
        """app 302 -> start -> IdP (TOTP) -> callback -> back to ``path``."""
        status, headers, _ = await self.get(path)
        assert status == 302, (status, headers)
        start = headers["Location"]
        assert start.startswith("/_stepup/start?level=")
        status, headers, _ = await self.get(start)
        assert status == 302
        authorize = headers["Location"]
        callback = await self.idp_login(authorize, otp=True)
        status, headers, body = await self.get(callback)
        assert status == 303, body
        assert headers["Location"] == path
        return parse_qs(urlsplit(authorize).query)


@pytest.fixture
async def browser(stack: Stack) -> AsyncIterator[Browser]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        yield Browser(s, stack)


async def password_token(stack: Stack, *, otp: bool = False) -> str:
    return await builders.password_token(stack.idp_url, otp=otp)


async def api_get(
    stack: Stack, path: str, token: str | None = None, **headers: str
) -> tuple[int, dict[str, str], str]:
    h = dict(headers)
    if token:
        h["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as s,
        s.get(stack.envoy_url + path, headers=h, allow_redirects=False) as r,
    ):
        return r.status, dict(r.headers), await r.text()


# (a) no token ---------------------------------------------------------------------------


async def test_no_token_browser_gets_login_redirect_api_gets_401(
    stack: Stack, browser: Browser
) -> None:
    status, headers, _ = await browser.get("/accounts/123")
    assert status == 302
    assert headers["Location"] == "/_stepup/login?rd=%2Faccounts%2F123"
    assert headers["x-stepup-reason"] == "no-credentials"
    status, headers, body = await api_get(stack, "/accounts/123")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="stepup-authz"'
    assert json.loads(body)["decision_id"] == headers["x-stepup-decision-id"]


# (b) acr too weak -------------------------------------------------------------------------


async def test_weak_acr_browser_redirect_and_exact_rfc9470_challenge(
    stack: Stack, browser: Browser
) -> None:
    token = await password_token(stack)
    status, headers, _ = await browser.get(
        "/accounts/123", headers={"Cookie": f"stepup-token={token}"}
    )
    assert status == 302
    assert headers["Location"].startswith("/_stepup/start?level=elevated&rd=%2Faccounts%2F123&ctx=")
    status, headers, _ = await browser.get(
        headers["Location"], headers={"Cookie": f"stepup-token={token}"}
    )
    q = parse_qs(urlsplit(headers["Location"]).query)
    assert q["acr_values"] == ["mfa phr"] and q["max_age"] == ["900"] and q["prompt"] == ["login"]
    status, headers, _ = await api_get(stack, "/accounts/123", token)
    assert status == 401
    assert headers["WWW-Authenticate"] == (
        'Bearer realm="stepup-authz", error="insufficient_user_authentication", '
        'error_description="A different authentication level is required", '
        'acr_values="mfa phr", max_age=900'
    )
    assert headers["x-stepup-reason"] == "acr-insufficient"
    # a per-route context extension raises /wires/ to "high" (max_age 300)
    status, headers, _ = await api_get(stack, "/wires/9", token)
    assert status == 401 and headers["WWW-Authenticate"].endswith("max_age=300")


# (c) the full browser round trip ------------------------------------------------------------


async def test_browser_round_trip_with_totp(stack: Stack, browser: Browser) -> None:
    await browser.sign_in("/accounts/123")
    q = await browser.step_up("/accounts/123")
    assert q["acr_values"] == ["mfa phr"]
    status, _, body = await browser.get(
        "/accounts/123",
        headers={"X-Stepup-User": "mallory", "X-Stepup-Acr": "phr", "X-Stepup-Extra": "forged"},
    )
    assert status == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-stepup-user"] == "alice"
    assert seen["x-stepup-acr"] == "mfa"
    assert seen["x-stepup-level"] == "elevated"
    assert "x-stepup-extra" not in seen  # every client-sent x-stepup-* is gone
    assert seen["x-stepup-decision-id"]


async def test_signing_out_at_the_dev_idp_challenges_the_elevated_route_again(
    stack: Stack, browser: Browser
) -> None:
    """The demo's logout: the dev IdP posts its logout token through Envoy to
    /_stepup/backchannel-logout; the session's grant is gone and its token refused."""
    await browser.sign_in("/accounts/7")
    await browser.step_up("/accounts/7")
    assert (await browser.get("/accounts/7"))[0] == 200
    status, _, page = await browser.get(f"{stack.idp_url}/logout")
    assert status == 200 and 'method="post"' in page
    after = f"{stack.envoy_url}/"
    status, headers, _ = await browser.post(
        f"{stack.idp_url}/logout",
        {"client_id": builders.CLIENT_ID, "post_logout_redirect_uri": after},
    )
    assert status == 303 and headers["Location"] == after
    status, headers, _ = await browser.get("/accounts/7")
    assert status == 302 and headers["Location"].startswith("/_stepup/login?rd=")
    assert "back-channel logout client=stepup-authz status=200" in stack.log_path("idp").read_text()


# (d) the grant expires: tests/integration/test_service.py::test_grant_expiry_challenges_again,
# the same round trip in-process on an injected clock (a real process's clock cannot be moved,
# and waiting out a grant in real time is a sleep).


# (e) Redis stopped mid-test ------------------------------------------------------------------


async def test_redis_down_denies_every_sensitive_request_then_recovers(stack: Stack) -> None:
    token = await password_token(stack)
    mfa_browser_token = await password_token(stack)
    assert (await api_get(stack, "/accounts/1", token))[0] == 401  # reads the session
    stack.stop_redis()
    try:
        statuses = []
        for path in ("/accounts/1", "/wires/1", "/clients/7/statements") * 5:
            status, headers, _ = await api_get(stack, path, mfa_browser_token)
            statuses.append((status, headers.get("x-stepup-reason")))
        assert set(statuses) == {(403, "session-store-unavailable")}
    finally:
        stack.start_redis()
    deadline = time.monotonic() + 15
    status = 0
    while time.monotonic() < deadline:
        status = (await api_get(stack, "/accounts/1", token))[0]
        if status == 401:
            break
        assert status == 403  # never 200 while recovering
        await asyncio.sleep(0.2)
    assert status == 401  # the service reads the store again without a restart


# (f) return-path attacks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "rd",
    [
        "//evil.example",
        "/\\evil.example",
        "https://evil.example",
        "/%09/evil.example",
        "https:evil.example",
        "/%2F%2Fevil.example",
        "javascript:alert(1)",
    ],
)
async def test_return_path_attacks_land_on_the_landing_page(
    stack: Stack, browser: Browser, rd: str
) -> None:
    status, headers, _ = await browser.get("/_stepup/login", params={"rd": rd})
    assert status == 302
    callback = await browser.idp_login(headers["Location"], otp=False)
    status, headers, _ = await browser.get(callback)
    assert status == 303
    assert headers["Location"] == "/"


async def test_metrics_count_the_decisions(stack: Stack) -> None:
    await api_get(stack, "/accounts/1")
    async with aiohttp.ClientSession() as s, s.get(f"{stack.service_http_url}/metrics") as r:
        text = await r.text()
    assert re.search(
        r'stepup_authz_checks_total\{level="elevated",outcome="login",reason="no-credentials"\} '
        r"[1-9]",
        text,
    )


def test_logs_never_carry_a_token_or_cookie(stack: Stack) -> None:
    # Runs after the module's other tests (file order): tokens, codes and cookies have all
    # crossed the service by now. Every JWT starts with base64url('{"') = "eyJ".
    for name in ("service", "envoy"):
        text = stack.log_path(name).read_text()
        assert text, f"{name} log is empty"
        assert "eyJ" not in text, f"a JWT reached the {name} log"
        assert "stepup-token=" not in text and "code=" not in text
