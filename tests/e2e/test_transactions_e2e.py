"""A wire approved one wire at a time (transaction binding, dynamic linking), end to end:
the demo stack with passkeys (Envoy rendered by ``render envoy`` for
examples/policy-passkeys.yaml, the service, Valkey, the dev IdP, the echo upstream) and
Debian's Chromium with its virtual authenticator.

The browser POSTs a wire (a JSON body) from a page of the app; the Check refuses it and
sends the browser to the passkey page, which shows the amount and the payee the Check
signed; the key approves; the browser goes back to the page and submits again. That
submission reaches the upstream once; a wire with another body, and the same wire a
second time, are sent to approve again.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Browser, Page, Route

from authz.demo.stack import Stack
from tests.browser import chromium
from tests.e2e.test_passkeys_demo import (
    STACK,
    _echoed,
    _enrolled_a_minute_ago,
    _idp_sign_in,
    _page_with_authenticator,
)
from tests.integration.test_passkeys_browser import HARDWARE_KEY

pytestmark = pytest.mark.e2e

FORM = "/public/send-a-wire"  # the page the wire is sent from (public: the echo upstream)
WIRE = {"amount": "25,000.00 USD", "payee": {"name": "ACME Clearing"}, "ref": "inv-7"}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


async def _send(page: Page, stack: Stack, body: dict[str, Any]) -> str:
    """From the form page, a top-level POST of /wires/ with ``body`` as JSON (a browser
    form cannot send JSON, so the test rewrites the form's request); the URL it ends on."""
    await page.goto(stack.public_url + FORM)
    raw = json.dumps(body)

    async def as_json(route: Route) -> None:
        headers = {
            k: v
            for k, v in (await route.request.all_headers()).items()
            if k != "content-length" and not k.startswith(":")
        }
        headers["content-type"] = "application/json"
        await route.continue_(method="POST", post_data=raw, headers=headers)

    def is_wire(url: str) -> bool:
        return urlsplit(url).path == "/wires/"

    await page.route(is_wire, as_json)
    try:
        async with page.expect_navigation():
            await page.evaluate(
                """() => { const f = document.createElement("form");
                  f.method = "POST"; f.action = "/wires/";
                  document.body.appendChild(f); f.submit(); }"""
            )
    finally:
        await page.unroute(is_wire, as_json)
    return page.url


async def test_a_wire_approval_allows_that_wire_once_and_nothing_else(
    stack_factory: Any, browser: Browser
) -> None:
    stack = stack_factory(**STACK)
    page, _, _ = await _page_with_authenticator(browser, HARDWARE_KEY)
    await page.goto(f"{stack.public_url}/accounts/123")
    await _idp_sign_in(page, stack, "/accounts/123")
    await page.goto(f"{stack.public_url}/_stepup/passkey/keys")
    await page.fill("#key-name", "Desk key")
    await page.click("#add")
    await page.wait_for_url(re.compile(r"added=1"))
    await _enrolled_a_minute_ago(stack, stack.idp_url)

    # The wire: refused by the Check, to the passkey page, which shows what is approved.
    landed = await _send(page, stack, WIRE)
    assert "/_stepup/passkey?level=wire" in landed and "tx=" in landed, (
        landed + await page.content()
    )
    await page.wait_for_selector("#go")
    shown = await page.inner_text(".action")
    assert "POST localhost/wires/" in shown
    assert "25,000.00 USD" in shown and "ACME Clearing" in shown
    assert "this request only, and only once" in shown
    await page.click("#go")
    await page.wait_for_selector("#resubmit:not([hidden])")
    assert "submit it again within" in await page.inner_text("#status")
    await page.click("#resubmit a")  # back to where the wire was sent from
    await page.wait_for_url(stack.public_url + FORM)

    # Another wire (other amount) is not covered: approve again. It does not use the grant up.
    other = await _send(page, stack, {**WIRE, "amount": "95,000.00 USD"})
    assert "/_stepup/passkey?level=wire" in other, other
    assert "95,000.00 USD" in await page.inner_text(".action")

    # The approved wire passes, once, to the upstream, with the key's evidence.
    done = await _send(page, stack, WIRE)
    assert urlsplit(done).path == "/wires/", done
    seen = await _echoed(page)
    assert seen["x-stepup-level"] == "wire"
    assert seen["x-stepup-acr"] == "phr"
    assert seen["x-stepup-amr"] == "hwk user pin mfa"
    assert seen["content-length"] == str(len(json.dumps(WIRE)))  # the body went upstream
    assert "POST" in await page.inner_text("h1")

    # The same wire again (a replay, a double submission): approve again.
    again = await _send(page, stack, WIRE)
    assert "/_stepup/passkey?level=wire" in again, again
    await page.context.close()
