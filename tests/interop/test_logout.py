"""Logout end to end: panva's oidc-provider (its backchannelLogout and rpInitiatedLogout
features, our endpoint registered as the client's ``backchannel_logout_uri``) as the IdP
of the real stack -- Envoy as ``render envoy`` makes it, the service, Valkey, the audit
exporter, the echo upstream.

The browser (a cookie-keeping client) signs in with a password, steps up with a one-time
code, and the elevated route answers 200. Then the session ends at the OP, and the OP's
own back-channel POST (through Envoy, as an IdP reaches a deployed service) must make that
same route challenge again; or the user signs out here, and the browser must go through
the OP's end_session_endpoint and come back only to the allowlisted address.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import jwt
import pytest

from authz.audit.export import read_records
from authz.core.session import session_key
from authz.demo.stack import REPO_ROOT, Stack, free_ports
from tests.builders import wait_until
from tests.interop.harness import CLIENT_ID, CLIENT_SECRET, Browser, Op, running_op

pytestmark = [pytest.mark.interop, pytest.mark.e2e]

ROUTE = "/accounts/123"  # elevated in examples/policy.yaml: acr mfa or phr
ARCHIVE_WAIT_S = 20.0
BROWSER_ACCEPT = "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"


@pytest.fixture(scope="module")
def logout_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Op, Stack]]:
    workdir: Path = tmp_path_factory.mktemp("logout-stack")
    (listen,) = free_ports(1)
    envoy = f"http://127.0.0.1:{listen}"
    # The keycloak configuration: JWT access tokens carrying the session's `sid`, as
    # Keycloak's do; the logout token then names a session the service knows.
    with running_op(
        "keycloak",
        workdir,
        redirect_uris=(f"{envoy}/_stepup/callback",),
        backchannel_logout_uri=f"{envoy}/_stepup/backchannel-logout",
        post_logout_redirect_uris=(f"{envoy}/",),
    ) as op:
        port = urlsplit(op.issuer).port
        assert port is not None
        stack = Stack(
            workdir / "stack",
            policy_file=REPO_ROOT / "examples" / "policy.yaml",
            with_idp=False,
            idp_port=port,
            listen_port=listen,
            extra_settings={
                "oidc": {
                    "client_secret": CLIENT_SECRET,
                    "profile": "keycloak",
                    "token_typ": ["JWT"],
                },
                "logout": {"post_logout_redirect_uris": [f"{envoy}/"]},
            },
        )
        assert stack.envoy_url == envoy and stack.idp_url == op.issuer
        stack.start()
        try:
            yield op, stack
        finally:
            stack.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # A browser: it asks for HTML, so the Check redirects it rather than answering 401.
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), headers={"Accept": BROWSER_ACCEPT}
    ) as session:
        yield session


def absolute(stack: Stack, location: str) -> str:
    return location if location.startswith("http") else stack.envoy_url + location


async def through_the_op(
    http: aiohttp.ClientSession, op: Op, stack: Stack, url: str, factor: str
) -> str:
    """From a /_stepup/login or /start URL: to the OP, sign in, back to the callback.
    Returns where the callback sends the browser."""
    async with http.get(url, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        authorize = resp.headers["Location"]
    assert authorize.startswith(op.issuer)
    browser = Browser(op, http, redirect_uri=f"{stack.envoy_url}/_stepup/callback")
    query = await browser.authorize_url(authorize, factor=factor)
    callback = f"{stack.envoy_url}/_stepup/callback?{urlencode(query)}"
    async with http.get(callback, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
        return absolute(stack, resp.headers["Location"])


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    async with http.get(url, allow_redirects=False) as resp:
        await resp.read()
        return resp.status, resp.headers.get("Location")


async def signed_in_and_stepped_up(http: aiohttp.ClientSession, op: Op, stack: Stack) -> None:
    url = stack.envoy_url + ROUTE
    status, location = await get(http, url)
    assert status == 302 and location is not None and "/_stepup/login" in location
    back = await through_the_op(http, op, stack, absolute(stack, location), "pwd")
    assert back == url
    status, location = await get(http, url)  # a password is not enough here
    assert status == 302 and location is not None and "/_stepup/start" in location
    back = await through_the_op(http, op, stack, absolute(stack, location), "otp")
    assert back == url
    status, _ = await get(http, url)
    assert status == 200  # the step-up grant


def logout_records(stack: Stack, via: str) -> list[dict[str, Any]]:
    recs = read_records([stack.audit_dir]) if stack.audit_dir.is_dir() else []
    return [r for r in recs if r.get("type") == "logout" and r.get("via") == via]


async def end_session_at_the_op(http: aiohttp.ClientSession, url: str) -> str:
    """The OP's end_session_endpoint: its confirmation page, then "Sign out" (logout=yes:
    the whole OP session, every client in it). Returns where the OP sends the browser."""
    async with http.get(url, allow_redirects=False) as resp:
        page = await resp.text()
        assert resp.status == 200, page
    action = re.search(r'<form id="op.logoutForm" method="post" action="([^"]+)"', page)
    xsrf = re.search(r'name="xsrf" value="([^"]+)"', page)
    assert action and xsrf, page
    form = {"xsrf": xsrf.group(1), "logout": "yes"}
    async with http.post(action.group(1), data=form, allow_redirects=False) as resp:
        await resp.read()
        assert resp.status in (302, 303), resp.status
        return resp.headers["Location"]


async def test_logout_at_the_op_reaches_the_service_and_the_elevated_route_is_challenged(
    logout_stack: tuple[Op, Stack], http: aiohttp.ClientSession
) -> None:
    op, stack = logout_stack
    await signed_in_and_stepped_up(http, op, stack)
    before = len(logout_records(stack, "back-channel"))
    token = next(c.value for c in http.cookie_jar if c.key == "stepup-token")
    sid = jwt.decode(token, options={"verify_signature": False})["sid"]  # the OP's session

    # The user signs out at the IdP (another application's button, the IdP's portal): the
    # OP posts a logout token to the service before it answers the confirmation.
    await end_session_at_the_op(http, f"{op.issuer}/session/end?client_id={CLIENT_ID}")
    assert "backchannel logout failed" not in op.log()

    status, location = await get(http, stack.envoy_url + ROUTE)  # same cookie, same token
    assert status == 302 and location is not None and "/_stepup/login" in location
    wait_until(
        lambda: len(logout_records(stack, "back-channel")) > before,
        "the back-channel logout record in the archive",
        timeout_s=ARCHIVE_WAIT_S,
    )
    rec = logout_records(stack, "back-channel")[-1]
    assert (rec["outcome"], rec["user"]) == ("success", f"{op.issuer}|u1-alice")
    # The logout token named the session the access token is of (its `sid`): that session
    # was ended, not every session of the user.
    assert rec["session"] == session_key(op.issuer, "u1-alice", sid)
    assert rec["grants_ended"] == 1


async def test_rp_initiated_logout_ends_the_session_here_and_at_the_op(
    logout_stack: tuple[Op, Stack], http: aiohttp.ClientSession
) -> None:
    op, stack = logout_stack
    await signed_in_and_stepped_up(http, op, stack)

    # A cross-site form cannot sign the user out.
    async with http.post(
        f"{stack.envoy_url}/_stepup/logout",
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 403
    assert (await get(http, stack.envoy_url + ROUTE))[0] == 200

    token = next(c.value for c in http.cookie_jar if c.key == "stepup-token")
    async with http.post(
        f"{stack.envoy_url}/_stepup/logout",
        headers={"Origin": stack.envoy_url},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303
        end_session = resp.headers["Location"]
    parts = urlsplit(end_session)
    assert end_session.startswith(f"{op.issuer}/session/end?")
    assert parse_qs(parts.query) == {
        "client_id": [CLIENT_ID],
        "post_logout_redirect_uri": [f"{stack.envoy_url}/"],
    }
    # The step-up cookies are gone from the browser, and the session is ended for the
    # token too (a copy of it, replayed, is refused).
    assert not {c.key for c in http.cookie_jar} & {"stepup-token", "stepup-state"}
    async with aiohttp.ClientSession(headers={"Accept": BROWSER_ACCEPT}) as other:
        copy = await other.get(
            stack.envoy_url + ROUTE,
            headers={"Cookie": f"stepup-token={token}"},
            allow_redirects=False,
        )
        assert copy.status == 302 and "/_stepup/login" in copy.headers["Location"]
    landed = await end_session_at_the_op(http, end_session)
    assert landed == f"{stack.envoy_url}/"
    wait_until(
        lambda: logout_records(stack, "rp-initiated"),
        "the rp-initiated logout record in the archive",
        timeout_s=ARCHIVE_WAIT_S,
    )
    rec = logout_records(stack, "rp-initiated")[-1]
    assert (rec["outcome"], rec["user"]) == ("success", f"{op.issuer}|u1-alice")
