"""Interop fixtures: panva's oidc-provider (tests/interop/harness.py) in a named
configuration, one OP per test, and a cookie-keeping client that signs in through it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.interop.harness import Browser, Op, running_op


@pytest.fixture
def op_factory(tmp_path: Path) -> Iterator[Callable[..., Op]]:
    """``op_factory(config, **kwargs) -> Op``: started OPs, each stopped by its PID."""
    with contextlib.ExitStack() as stack:

        def start(config: str = "default", **kwargs: Any) -> Op:
            return stack.enter_context(running_op(config, tmp_path, **kwargs))

        yield start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe=True: the OP's cookies are set for 127.0.0.1, an IP address
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


@pytest.fixture
def browser(http: aiohttp.ClientSession) -> Callable[[Op], Browser]:
    return lambda op: Browser(op, http)
