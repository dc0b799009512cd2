"""Headless Chromium for browser tests: Debian's ``chromium`` (installed by
``tools/system-deps``), driven by Playwright for Python with ``executable_path``.
Playwright's own browser download is never used (``playwright install`` is not needed).

    async with chromium() as browser:
        context = await browser.new_context()
        page = await context.new_page()

Flags: no sandbox (tests may run as root), no GPU, and none of Chromium's background
network traffic (component updates, sync, safe browsing), which a closed network refuses.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from playwright.async_api import Browser, async_playwright

LAUNCH_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
)


def chromium_path() -> str:
    """``$STEPUP_CHROMIUM``, else ``chromium`` on PATH, else Debian's /usr/bin/chromium."""
    found = os.environ.get("STEPUP_CHROMIUM") or shutil.which("chromium")
    return found or "/usr/bin/chromium"


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium_path(), headless=True, args=list(LAUNCH_ARGS)
        )
        try:
            yield browser
        finally:
            await browser.close()
