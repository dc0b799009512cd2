"""The browser harness itself: Debian's Chromium starts under Playwright and renders."""

from __future__ import annotations

from tests.browser import chromium


async def test_chromium_renders_a_page_and_offers_a_virtual_authenticator() -> None:
    async with chromium() as browser:
        context = await browser.new_context()
        page = await context.new_page()
        await page.set_content("<main><h1>stepup-authz</h1></main>")
        assert await page.inner_text("h1") == "stepup-authz"
        cdp = await context.new_cdp_session(page)
        await cdp.send("WebAuthn.enable")
        added = await cdp.send(
            "WebAuthn.addVirtualAuthenticator",
            {"options": {"protocol": "ctap2", "transport": "usb", "hasUserVerification": True}},
        )
        assert added["authenticatorId"]
