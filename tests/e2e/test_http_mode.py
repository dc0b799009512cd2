"""End to end through the real Envoy in ext_authz HTTP mode (``render envoy --mode http``, the
service's ``http_authz`` listener): the same decisions, statuses, challenges and identity
headers as the gRPC mode (issue 6, "Also serve Envoy's HTTP ext_authz protocol").
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from authz.demo.stack import REPO_ROOT, Stack

DEMO_POLICY = REPO_ROOT / "examples" / "policy.yaml"


class HttpModeStack(Stack):
    """The demo stack with Envoy's ext_authz in HTTP mode and the service's HTTP listener."""

    def __init__(self, workdir: Path, **kwargs: Any) -> None:
        kwargs.setdefault("policy_file", DEMO_POLICY)
        super().__init__(workdir, mode="http", **kwargs)


# -- the tests -------------------------------------------------------------------------------

pytestmark = pytest.mark.e2e
# A browser's Accept (the Check redirects it), naming JSON too so that the echo upstream
# answers what it received as data rather than its HTML table.
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/json;q=0.9"}
RFC9470_ELEVATED = (
    'Bearer realm="stepup-authz", error="insufficient_user_authentication", '
    'error_description="A different authentication level is required", '
    'acr_values="mfa phr", max_age=900'
)


@pytest.fixture(scope="module")
def hstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpModeStack]:
    s = HttpModeStack(tmp_path_factory.mktemp("http-mode"))
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        yield s


async def call(
    s: aiohttp.ClientSession,
    stack: Stack,
    path: str,
    token: str | None = None,
    method: str = "GET",
    **headers: str,
) -> tuple[int, dict[str, str], str]:
    h = dict(headers)
    if token:
        h["Authorization"] = f"Bearer {token}"
    url = path if path.startswith("http") else stack.envoy_url + path
    async with s.request(
        method, url, headers=h, allow_redirects=False, data=b"body" if method == "POST" else None
    ) as r:
        return r.status, dict(r.headers), await r.text()


async def token(stack: Stack) -> str:
    from .test_stepup_flow import password_token

    return await password_token(stack)


async def test_no_token_browser_redirect_api_401(
    hstack: HttpModeStack, session: aiohttp.ClientSession
) -> None:
    status, headers, _ = await call(session, hstack, "/accounts/123", **BROWSER)
    assert status == 302
    assert headers["Location"] == "/_stepup/login?rd=%2Faccounts%2F123"
    assert headers["x-stepup-reason"] == "no-credentials"
    assert headers["Cache-Control"] == "no-store"
    status, headers, body = await call(session, hstack, "/accounts/123")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="stepup-authz"'
    assert json.loads(body)["decision_id"] == headers["x-stepup-decision-id"]
    assert headers["Content-Type"] == "application/json"
    for internal in ("x-stepup-outcome", "x-stepup-level"):  # metadata only
        assert internal not in headers


async def test_weak_acr_exact_rfc9470_challenge_and_route_level(
    hstack: HttpModeStack, session: aiohttp.ClientSession
) -> None:
    t = await token(hstack)
    status, headers, _ = await call(session, hstack, "/accounts/123", t)
    assert status == 401
    assert headers["WWW-Authenticate"] == RFC9470_ELEVATED
    assert headers["x-stepup-reason"] == "acr-insufficient"
    status, headers, _ = await call(session, hstack, "/accounts/123", t, **BROWSER)
    assert status == 302
    assert headers["Location"].startswith("/_stepup/start?level=elevated&rd=%2Faccounts%2F123&ctx=")
    # The per-route check path /check@high raises /wires/ to "high" (max_age 300).
    status, headers, _ = await call(session, hstack, "/wires/9", t)
    assert status == 401 and headers["WWW-Authenticate"].endswith("max_age=300")
    # Envoy sends the original method: POST /accounts/ is "high" in the demo policy.
    status, headers, _ = await call(session, hstack, "/accounts/1", t, method="POST")
    assert status == 401 and headers["WWW-Authenticate"].endswith("max_age=300")
    # Decided on the normalised path the upstream would see.
    status, headers, _ = await call(session, hstack, "/public/../accounts/1", t)
    assert status == 401 and headers["WWW-Authenticate"] == RFC9470_ELEVATED


async def test_allow_injects_our_headers_and_strips_forged_ones(
    hstack: HttpModeStack, session: aiohttp.ClientSession
) -> None:
    t = await token(hstack)
    status, _, body = await call(
        session,
        hstack,
        "/news",
        t,
        **{
            "X-Stepup-User": "mallory",
            "X-Stepup-Acr": "phr",
            "X-Stepup-Extra": "forged",
            "X-Stepup-Peer-Address": "198.51.100.7",  # the blocked range: must be ignored
        },
    )
    assert status == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-stepup-user"] == "alice"
    assert seen["x-stepup-acr"] == "pwd"
    assert seen["x-stepup-level"] == "standard"
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", seen["x-stepup-decision-id"])  # a ULID
    for gone in (
        "x-stepup-extra",
        "x-stepup-peer-address",
        "x-stepup-outcome",
        "x-stepup-reason",
        "x-envoy-auth-headers-to-remove",
    ):
        assert gone not in seen
    # Public route: no identity headers of ours, and the forged ones are gone too.
    status, _, body = await call(session, hstack, "/", None, **{"X-Stepup-User": "mallory"})
    seen = json.loads(body)["headers"]
    assert status == 200 and "x-stepup-user" not in seen and seen["x-stepup-level"] == "public"


async def test_browser_step_up_round_trip(hstack: HttpModeStack) -> None:
    from .test_stepup_flow import Browser

    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        b = Browser(s, hstack)
        await b.sign_in("/accounts/123")
        await b.step_up("/accounts/123")
        status, _, body = await b.get("/accounts/123", headers={"X-Stepup-User": "mallory"})
        assert status == 200, body
        seen = json.loads(body)["headers"]
        assert seen["x-stepup-user"] == "alice" and seen["x-stepup-acr"] == "mfa"
        assert seen["x-stepup-level"] == "elevated"


async def test_access_log_carries_the_decision_id(
    hstack: HttpModeStack, session: aiohttp.ClientSession
) -> None:
    status, headers, _ = await call(session, hstack, "/accounts/77")
    assert status == 401
    did = headers["x-stepup-decision-id"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in hstack.log_path("envoy").read_text().splitlines():
            if did in line:
                entry = json.loads(line)
                assert entry["decision_id"] == did
                assert entry["outcome"] == "login" and entry["reason"] == "no-credentials"
                return
        await asyncio.sleep(0.1)
    pytest.fail("decision id not in Envoy's access log")


async def test_redis_down_is_403_session_store_unavailable(
    hstack: HttpModeStack, session: aiohttp.ClientSession
) -> None:
    t = await token(hstack)
    assert (await call(session, hstack, "/accounts/1", t))[0] == 401
    hstack.stop_redis()
    try:
        seen = set()
        for path in ("/accounts/1", "/wires/1", "/clients/7/statements") * 3:
            status, headers, _ = await call(session, hstack, path, t)
            seen.add((status, headers.get("x-stepup-reason")))
        assert seen == {(403, "session-store-unavailable")}
    finally:
        hstack.start_redis()


def test_fails_closed_when_the_http_authorizer_is_down(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import urllib.error
    import urllib.request

    s = HttpModeStack(tmp_path_factory.mktemp("http-mode-down"), with_service=False, with_idp=False)
    s.start()
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for path in ("/accounts/1", "/news", "/"):
            with pytest.raises(urllib.error.HTTPError) as info:
                opener.open(s.envoy_url + path, timeout=5)
            info.value.close()
            assert info.value.code == 403
    finally:
        s.stop()
