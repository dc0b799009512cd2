"""The browser step-up in real Chromium through the real stack (Envoy, the service, the dev
IdP, Valkey, the echo upstream): what a user sees at each page, and that no page is a dead
end -- Back from the step-up page, a reload of the callback after success and a sign-in
page whose state is gone all lead back to the page wanted. A refused request is a page, not
JSON. The screenshots in docs/img come from here:

    STEPUP_SCREENSHOTS=docs/img .venv/bin/python -m pytest -q tests/e2e/test_stepup_pages_browser.py
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
import redis

from authz.demo.stack import Stack
from authz.devidp import ALICE_TOTP_SECRET
from tests.browser import chromium

from .conftest import DEMO_POLICY, make_stack

pytestmark = pytest.mark.e2e

# Where STEPUP_SCREENSHOTS says (docs/img to refresh the docs), else a scratch folder.
IMG = Path(os.environ.get("STEPUP_SCREENSHOTS") or tempfile.mkdtemp(prefix="stepup-shots-"))

# The demo policy and a back office reachable only from a network the test is not on.
POLICY = DEMO_POLICY.read_text().replace(
    "routes:                                    # first match wins\n",
    "  internal: {ip_allow: [203.0.113.0/24], title: Back office}\n"
    "routes:                                    # first match wins\n"
    "  - {path_prefix: /admin/, level: internal, title: Back office}\n",
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(POLICY)
    with make_stack(tmp_path_factory, policy_file=policy) as s:
        yield s


@pytest.fixture
async def page(stack: Stack) -> AsyncIterator[Any]:
    async with chromium() as browser:
        context = await browser.new_context(viewport={"width": 900, "height": 640})
        tab = await context.new_page()
        tab.callbacks = []  # the callback URLs the browser was sent to, in order
        tab.on(
            "request",
            lambda r: tab.callbacks.append(r.url) if "/_stepup/callback" in r.url else None,
        )
        yield tab


def code() -> str:
    return pyotp.TOTP(ALICE_TOTP_SECRET).now()


async def password_sign_in(page: Any, stack: Stack, path: str) -> None:
    """Open ``path``; the first sign-in (password only) at the dev IdP."""
    await page.goto(stack.envoy_url + path)
    await page.fill("#username", "alice")
    await page.fill("#password", "alice-password")
    await page.click("button[type=submit]")


async def at_second_factor(page: Any, stack: Stack) -> None:
    await page.wait_for_selector("#otp")
    assert page.url.startswith(stack.idp_url)
    assert await page.locator("#password").count() == 0  # the password is not asked again


async def confirm(page: Any) -> None:
    await page.fill("#otp", code())
    await page.click("button[type=submit]")
    await page.wait_for_selector("table")


async def continue_button(page: Any) -> tuple[str, str]:
    button = page.locator("a.button")
    return (await button.inner_text(), str(await button.get_attribute("href")))


async def test_the_step_up_explains_itself_and_lands_on_the_header_table(
    page: Any, stack: Stack
) -> None:
    await password_sign_in(page, stack, "/accounts/123")
    await at_second_factor(page, stack)
    text = await page.inner_text("body")
    assert "Signed in as alice" in text and "asks for a second factor" in text
    await page.screenshot(path=str(IMG / "stepup-second-factor.png"))
    await confirm(page)
    assert page.url == stack.envoy_url + "/accounts/123"
    rows = {
        await r.locator("th").inner_text(): await r.locator("td").inner_text()
        for r in await page.locator("tbody tr").all()
    }
    assert rows["x-stepup-user"] == "alice" and rows["x-stepup-acr"] == "mfa"
    assert rows["x-stepup-level"] == "elevated"
    await page.screenshot(path=str(IMG / "echo-headers.png"), full_page=True)

    # Reloading the callback after success: not a dead end, back to the page wanted.
    await page.goto(page.callbacks[-1])
    assert "already used" in await page.inner_text("h1")
    assert await continue_button(page) == ("Continue to \u201cYour accounts\u201d", "/accounts/123")
    assert "Reference:" in await page.inner_text("main")
    await page.screenshot(path=str(IMG / "stepup-already-used.png"))
    await page.click("a.button")
    await page.wait_for_selector("table")  # the grant holds: straight to the page
    assert page.url == stack.envoy_url + "/accounts/123"


async def test_back_from_the_step_up_page_restarts_it_for_the_page_wanted(
    page: Any, stack: Stack
) -> None:
    await password_sign_in(page, stack, "/accounts/7")
    await at_second_factor(page, stack)
    await page.go_back()  # into the first sign-in's page: the IdP answers its old state
    await page.wait_for_selector("h1")
    heading = await page.inner_text("h1")
    assert "Sign-in expired" not in heading, await page.content()
    assert "already used" in heading
    assert (await continue_button(page))[1] == "/accounts/7"
    await page.click("a.button")
    await at_second_factor(page, stack)  # the step-up again, for the same page
    await confirm(page)
    assert page.url == stack.envoy_url + "/accounts/7"


async def test_a_sign_in_page_whose_state_is_gone_restarts_the_step_up(
    page: Any, stack: Stack
) -> None:
    """As after stepup.state_ttl_s: the state is gone from Redis and its cookie from the
    browser (both expire together); the page was left open."""
    await password_sign_in(page, stack, "/accounts/9")
    await at_second_factor(page, stack)
    r = redis.Redis.from_url(stack.redis_url)
    try:
        gone = [k for k in r.scan_iter(match="*st:*") if r.delete(k)]
    finally:
        r.close()
    assert gone
    await page.context.clear_cookies(name="stepup-state")
    await page.fill("#otp", code())
    await page.click("button[type=submit]")
    await page.wait_for_selector("a.button")
    assert (await continue_button(page))[1] == "/accounts/9"
    await page.click("a.button")
    await at_second_factor(page, stack)


async def test_a_refused_request_is_a_page_for_the_browser(page: Any, stack: Stack) -> None:
    await password_sign_in(page, stack, "/news")
    await page.wait_for_selector("table")
    response = await page.goto(stack.envoy_url + "/admin/users")
    assert response.status == 403
    assert response.headers["content-type"].startswith("text/html")
    assert await page.inner_text("h1") == "Not from this network"
    main = await page.inner_text("main")
    assert response.headers["x-stepup-decision-id"] in main
    assert await continue_button(page) == ("Try again", "/admin/users")
    await page.screenshot(path=str(IMG / "stepup-refused.png"))
