"""The demo with passkeys on (``make demo ARGS=--passkeys``), as a newcomer uses it: the real
stack (Envoy, the service, Valkey, the dev IdP, the echo upstream) and Debian's Chromium
under Playwright with its virtual authenticator (CDP WebAuthn domain).

A TOTP step-up at the IdP opens enrolment; a security key is enrolled on the keys page; a
wire then needs that key, and the echo upstream shows the ``amr`` the grant rests on.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
import redis.asyncio as aioredis
from playwright.async_api import Browser, CDPSession, Page, Route

from authz.config.settings import load_settings
from authz.core.session import user_key
from authz.demo.__main__ import guide
from authz.demo.options import REPO_ROOT
from authz.demo.stack import Stack
from authz.devidp import ALICE_TOTP_SECRET, BOB_TOTP_SECRET
from authz.store.credentials import RedisCredentialStore
from authz.store.crypto import cipher_from_settings
from tests.browser import chromium
from tests.integration.test_passkeys_browser import HARDWARE_KEY, SYNCED_PASSKEY

from .conftest import make_stack

pytestmark = pytest.mark.e2e

POLICY = REPO_ROOT / "examples" / "policy-passkeys.yaml"
# A longer ext_authz deadline than the demo's 0.25 s (on a loaded machine a late Check is
# Envoy's bare 403, as tests/docs/test_printed_commands.py says) and a longer one for the
# callback's code exchange with the IdP and each Redis call: this machine is shared.
STACK: dict[str, Any] = {
    "policy_file": POLICY,
    "passkeys": True,
    "authz_timeout": "2s",
    "extra_settings": {"oidc": {"http_timeout_s": 20}, "redis": {"deadline_ms": 1500}},
}


@pytest.fixture(scope="module")
def pk_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with make_stack(tmp_path_factory, **STACK) as s:
        yield s


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


TOTP = {"alice": ALICE_TOTP_SECRET, "bob": BOB_TOTP_SECRET}


async def _page_with_authenticator(
    browser: Browser, options: dict[str, Any]
) -> tuple[Page, CDPSession, dict[str, Any]]:
    """A fresh browser context's page with Chromium's virtual authenticator (CDP WebAuthn
    domain) of ``options`` attached: the page, its CDP session and the authenticator added."""
    context = await browser.new_context()
    context.set_default_timeout(60_000)  # each step; a loaded machine is slow, not wrong
    page = await context.new_page()
    cdp = await context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable")
    added = await cdp.send("WebAuthn.addVirtualAuthenticator", {"options": options})
    return page, cdp, added


async def _idp_sign_in(page: Page, stack: Stack, back_to: str, user: str = "alice") -> None:
    """Answer the dev IdP's forms (password, then the TOTP when asked) until the browser is
    back on the app at ``back_to``."""
    app = stack.public_url + back_to
    await page.wait_for_url(lambda u: u.startswith((stack.idp_url, app)))
    for _ in range(3):
        if page.url.startswith(app):
            return
        if not page.url.startswith(stack.idp_url) or not await page.query_selector(
            "#otp, #username"
        ):
            raise AssertionError(f"not the IdP's form: {page.url}: {await page.inner_text('body')}")
        if await page.query_selector("#username"):  # else: signed in there, the code alone
            await page.fill("#username", user)
            await page.fill("#password", f"{user}-password")
        if await page.query_selector("#otp"):
            await page.fill("#otp", pyotp.TOTP(TOTP[user]).now())
        # One navigation: the form post and every redirect after it (callback, the app, the
        # Check's next step-up), to the page that comes last.
        async with page.expect_navigation():
            await page.click("button[type=submit]")
    raise AssertionError(f"still at the IdP: {page.url}: {await page.inner_text('body')}")


async def _echoed(page: Page) -> dict[str, str]:
    """The headers the demo upstream received, from its page (a table, for a browser)."""
    rows: list[list[str]] = await page.eval_on_selector_all(
        "tbody tr", "rows => rows.map(r => [r.cells[0].innerText, r.cells[1].innerText])"
    )
    return {k: v for k, v in rows}


async def _enrolled_a_minute_ago(stack: Stack, issuer: str) -> None:
    """Move the enrolment time of the user's key one minute back, sealed as the service
    seals it: the newcomer enrols, then steps up later. (A key enrolled at or after the
    step-up began never satisfies it; tests/integration/test_passkeys_browser.py shows that
    rule with the clock under the test's control. A real clock cannot promise the next
    second here without waiting for it.)"""
    settings = load_settings(stack.workdir / "config.yaml")
    client = aioredis.Redis.from_url(stack.redis_url)
    try:
        store = RedisCredentialStore(
            client,
            prefix=settings.redis.key_prefix,
            deadline_ms=2000,
            cipher=cipher_from_settings(settings.crypto),
        )
        uk = user_key(issuer, "alice")
        [cred] = await store.credentials(uk)
        earlier = dataclasses.replace(cred, created_at=cred.created_at - 60)
        await store.add(uk, earlier, replace_existing=True)
    finally:
        await client.aclose()


async def test_a_newcomer_enrols_a_key_after_a_totp_stepup_and_wires_need_it(
    pk_stack: Stack, browser: Browser
) -> None:
    stack = pk_stack
    page, _, _ = await _page_with_authenticator(browser, HARDWARE_KEY)

    # a. The IdP step-up (password, then TOTP) to "elevated", as the guide says.
    await page.goto(f"{stack.public_url}/accounts/123")
    await _idp_sign_in(page, stack, "/accounts/123")
    seen = await _echoed(page)
    assert seen["x-stepup-level"] == "elevated" and seen["x-stepup-amr"] == "pwd otp"

    # Before a key exists, a wire goes to the keys page (passkeys.no_credential: enrol).
    await page.goto(f"{stack.public_url}/wires/1")
    await page.wait_for_url(re.compile(r"/_stepup/passkey/keys\?for=high"))

    # b. Enrol a key on the keys page (the fresh TOTP step-up allows it).
    await page.goto(f"{stack.public_url}/_stepup/passkey/keys")
    await page.fill("#key-name", "Desk key")
    await page.click("#add")
    await page.wait_for_url(re.compile(r"added=1"))
    assert "Desk key" in await page.inner_text("main")
    await _enrolled_a_minute_ago(stack, stack.idp_url)

    # c. The wire: the Check sends the browser to the passkey page, the key signs, the grant
    # goes through the one grant rule, and the retried request reaches the upstream.
    resp = await page.goto(f"{stack.public_url}/wires/1")
    assert resp is not None
    assert "/_stepup/passkey?level=high" in page.url
    assert "Wire transfers" in await page.inner_text("#why")
    await page.click("#go")
    await page.wait_for_url(f"{stack.public_url}/wires/1")
    seen = await _echoed(page)
    assert seen["x-stepup-level"] == "high"
    assert seen["x-stepup-acr"] == "phr"
    assert seen["x-stepup-amr"] == "hwk user pin mfa"
    assert seen["x-stepup-user"] == "alice"
    await page.context.close()


async def test_through_envoy_a_synced_passkey_and_a_key_added_mid_stepup_do_not_pass(
    pk_stack: Stack, browser: Browser
) -> None:
    """Bob's phone passkey is refused for wires (device-bound level), at enrolment, naming
    the rule; the hardware key he then adds from the step-up cannot complete that same
    step-up (Keycloak CVE-2023-3597). With the real clock this holds by construction: the
    key is created after the step-up began."""
    stack = pk_stack
    page, cdp, added = await _page_with_authenticator(browser, SYNCED_PASSKEY)
    await page.goto(f"{stack.public_url}/accounts/7")
    await _idp_sign_in(page, stack, "/accounts/7", user="bob")

    await page.goto(f"{stack.public_url}/wires/2")  # the step-up begins; no key yet
    await page.wait_for_url(re.compile(r"/_stepup/passkey/keys\?for=high"))
    [stepup] = parse_qs(urlsplit(page.url).query)["rd"]
    assert stepup.startswith("/_stepup/passkey?") and "st=" in stepup
    await page.fill("#key-name", "Phone")
    await page.click("#add")
    await page.wait_for_selector("#status.error")
    assert "synced passkey is not accepted" in await page.inner_text("#status")

    await cdp.send(
        "WebAuthn.removeVirtualAuthenticator", {"authenticatorId": added["authenticatorId"]}
    )
    await cdp.send("WebAuthn.addVirtualAuthenticator", {"options": HARDWARE_KEY})
    await page.reload()
    await page.fill("#key-name", "Desk key")
    await page.click("#add")
    await page.wait_for_url(re.compile(r"added=1"))
    assert "Desk key" in await page.inner_text("main") and "Phone" not in await page.inner_text(
        "main"
    )

    await page.goto(stack.public_url + stepup)  # back to the same step-up
    await page.click("#go")
    await page.wait_for_selector("#status.error")
    assert "added during this step-up" in await page.inner_text("#status")
    await page.goto(f"{stack.public_url}/wires/2")  # no grant: the Check still asks
    assert "/_stepup/passkey" in page.url
    await page.context.close()


async def test_through_envoy_no_user_verification_is_refused_and_a_removed_key_is_gone(
    stack_factory: Any, browser: Browser
) -> None:
    """A stack of its own (alice starts with no key). The key stops verifying its user and
    a page script asks the browser not to require it: "high" (UV required) refuses. Then
    alice removes the key on the keys page, and a wire sends her to enrol again."""
    stack = stack_factory(**STACK)
    page, cdp, added = await _page_with_authenticator(browser, HARDWARE_KEY)
    replies: list[dict[str, Any]] = []

    async def record(response: Any) -> None:
        if response.url.endswith("/authenticate/verify"):
            replies.append(await response.json())

    page.on("response", record)
    await page.goto(f"{stack.public_url}/accounts/123")
    await _idp_sign_in(page, stack, "/accounts/123")
    await page.goto(f"{stack.public_url}/_stepup/passkey/keys")
    await page.fill("#key-name", "Desk key")
    await page.click("#add")
    await page.wait_for_url(re.compile(r"added=1"))
    await _enrolled_a_minute_ago(stack, stack.idp_url)

    await cdp.send(
        "WebAuthn.setUserVerified",
        {"authenticatorId": added["authenticatorId"], "isUserVerified": False},
    )

    async def discourage(route: Route) -> None:
        resp = await route.fetch()
        doc = await resp.json()
        doc["publicKey"]["userVerification"] = "discouraged"
        await route.fulfill(response=resp, body=json.dumps(doc))

    await page.route("**/authenticate/options", discourage)
    await page.goto(f"{stack.public_url}/wires/1")
    await page.click("#go")
    await page.wait_for_selector("#status.error")
    assert "PIN or fingerprint" in await page.inner_text("#status")
    assert replies[-1]["reason"] == "user-verification-required"
    await page.goto(f"{stack.public_url}/wires/1")
    assert "/_stepup/passkey" in page.url  # no grant was written

    await page.goto(f"{stack.public_url}/_stepup/passkey/keys")
    await page.click("button.remove")
    await page.wait_for_url(re.compile(r"removed=1"))
    assert "no security keys" in await page.inner_text("main")
    await page.goto(f"{stack.public_url}/wires/1")
    await page.wait_for_url(re.compile(r"/_stepup/passkey/keys\?for=high"))
    await page.context.close()


def test_the_guide_says_how_and_its_command_works(pk_stack: Stack) -> None:
    """The banner of ``make demo ARGS=--passkeys``: the steps on localhost, and the operator
    command it prints runs as printed."""
    text = guide(pk_stack, time.time())
    assert "Passkeys are on" in text
    assert f"{pk_stack.public_url}/_stepup/passkey/keys" in text
    assert "http://localhost:" in pk_stack.public_url
    [command] = [ln.strip() for ln in text.splitlines() if re.match(r"^ {5}\S.*passkeys list", ln)]
    r = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    # The start-up check of item 6: the demo's Valkey persists nothing, and the service says so.
    log = pk_stack.log_path("service").read_text()
    assert "not durable" in log


def test_the_option_picks_the_passkey_policy_unless_one_is_given() -> None:
    from authz.demo.options import policy_file

    args: Any = type("A", (), {"policy": None, "passkeys": False})()
    assert policy_file(args).name == "policy.yaml"
    args.passkeys = True
    assert policy_file(args) == POLICY
    args.policy = Path("mine.yaml")
    assert policy_file(args) == Path("mine.yaml")
