"""The passkey endpoints as an attacker's script sees them (no browser): cross-site
requests, a ceremony started by one session finished by another, a used challenge, junk."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import redis.asyncio as aioredis

from authz.core.session import session_key
from authz.core.transactions import TransactionRequest
from authz.store.connections import EmbeddedValkey
from tests.passkeys.harness import ISS, Stack, passkey_stack

pytestmark = pytest.mark.integration


async def _post(
    http: aiohttp.ClientSession,
    stack: Stack,
    path: str,
    body: Any,
    *,
    token: str,
    origin: str | None = "same",
    content_type: str = "application/json",
    cookie: str = "",
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    headers = {"Content-Type": content_type, "Cookie": f"stepup-token={token}{cookie}"}
    if origin is not None:
        headers["Origin"] = stack.url if origin == "same" else origin
    async with http.post(
        f"{stack.url}/_stepup/passkey{path}", data=json.dumps(body), headers=headers
    ) as r:
        try:
            doc = await r.json(content_type=None)
        except (ValueError, aiohttp.ContentTypeError):
            doc = {}
        return r.status, doc, r


async def test_cross_site_and_non_json_posts_are_refused(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with (
        passkey_stack(tmp_path, redis_url, redis_prefix) as stack,
        aiohttp.ClientSession() as http,
    ):
        token = stack.token()
        for origin in (None, "https://evil.example", "null"):
            status, doc, _ = await _post(
                http, stack, "/register/options", {"name": "k"}, token=token, origin=origin
            )
            assert status == 403 and doc["reason"] == "origin-missing" and doc["decision_id"]
        status, doc, _ = await _post(
            http, stack, "/register/options", {"name": "k"}, token=token, content_type="text/plain"
        )
        assert status == 415
        status, doc, _ = await _post(
            http, stack, "/authenticate/options", {"level": "high"}, token="junk"
        )
        assert status == 401 and doc["reason"] == "no-credentials"
        status, doc, _ = await _post(
            http, stack, "/authenticate/options", {"level": "standard"}, token=token
        )
        assert status == 400 and doc["reason"] == "passkey-not-offered"


async def test_a_ceremony_is_bound_to_the_session_that_started_it_and_used_once(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with (
        passkey_stack(tmp_path, redis_url, redis_prefix) as stack,
        aiohttp.ClientSession() as http,
    ):
        status, doc, resp = await _post(
            http, stack, "/register/options", {"name": "k"}, token=stack.token()
        )
        assert status == 200 and doc["publicKey"]["rp"]["id"] == "localhost"
        state = resp.cookies[stack.routes.cookie].value
        assert resp.cookies[stack.routes.cookie]["httponly"]
        cookie = f"; {stack.routes.cookie}={state}"
        # The same user, another session (another sid): the state is not theirs.
        stack.sid = "another-session"
        status, doc, _ = await _post(
            http, stack, "/register/verify", {"credential": {}}, token=stack.token(), cookie=cookie
        )
        assert status == 400 and doc["reason"] == "state-mismatch"
        # ... and it was consumed by that attempt: the right session cannot use it either.
        stack.sid = "s1"
        status, doc, _ = await _post(
            http, stack, "/register/verify", {"credential": {}}, token=stack.token(), cookie=cookie
        )
        assert status == 400 and doc["reason"] == "state-invalid"
        # A junk credential on a fresh challenge: refused with a reason, not a 500.
        status, doc, resp = await _post(
            http, stack, "/register/options", {"name": "k"}, token=stack.token()
        )
        cookie = f"; {stack.routes.cookie}={resp.cookies[stack.routes.cookie].value}"
        status, doc, _ = await _post(
            http,
            stack,
            "/register/verify",
            {"credential": {"response": {"clientDataJSON": "@@"}}},
            token=stack.token(),
            cookie=cookie,
        )
        assert status == 403 and doc["reason"] == "response-invalid"
        # Not JSON at all.
        status, doc, _ = await _post(http, stack, "/authenticate/verify", "[", token=stack.token())
        assert status == 400


async def test_pages_without_a_session_go_to_the_login(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with (
        passkey_stack(tmp_path, redis_url, redis_prefix) as stack,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(f"{stack.url}/_stepup/passkey/keys", allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"].startswith("/_stepup/login?rd=")
        async with http.get(
            f"{stack.url}/_stepup/passkey?level=nope&rd=https://evil.example/",
            allow_redirects=False,
        ) as r:
            assert r.status == 400
            text = await r.text()
            assert "Reference:" in text and "evil.example" not in text  # rd fell back to /
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        async with http.get(f"{stack.url}/_stepup/passkey/static/../handlers.py") as r:
            assert r.status == 404


@pytest.fixture
async def lossy_redis() -> AsyncIterator[str]:
    """A private Valkey that persists nothing (the test may change its settings; never the
    shared Redis's)."""
    server = EmbeddedValkey()
    url = await asyncio.to_thread(server.start)
    client = aioredis.Redis.from_url(url)
    try:
        await client.config_set("appendonly", "no")
        await client.config_set("save", "")
        yield url
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)


async def test_at_start_a_redis_that_may_lose_credentials_is_said_and_can_stop_enrolment(
    lossy_redis: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue item 6: the start-up check of the credential Redis. ``durability: warn`` logs
    and still enrols; ``durability: refuse`` refuses enrolment, naming why."""
    caplog.set_level(logging.WARNING, logger="authz.passkeys")
    async with (
        passkey_stack(tmp_path / "warn", lossy_redis, "w:", durability="warn") as stack,
        aiohttp.ClientSession() as http,
    ):
        assert stack.routes.durability is not None and not stack.routes.durability.ok
        warned = [r.getMessage() for r in caplog.records if "not durable" in r.getMessage()]
        assert warned and "WARNING" in warned[0] and "no persistence" in warned[0]
        status, doc, _ = await _post(
            http, stack, "/register/options", {"name": "k"}, token=stack.token()
        )
        assert status == 200 and "publicKey" in doc, doc
    caplog.clear()
    async with (
        passkey_stack(tmp_path / "refuse", lossy_redis, "r:", durability="refuse") as stack,
        aiohttp.ClientSession() as http,
    ):
        warned = [r.getMessage() for r in caplog.records if "not durable" in r.getMessage()]
        assert warned and "enrolment is refused" in warned[0]
        status, doc, _ = await _post(
            http, stack, "/register/options", {"name": "k"}, token=stack.token()
        )
        assert status == 503 and doc["reason"] == "enrolment-durability" and doc["decision_id"]
        # AOF on and no eviction of keys without a TTL: the next start enrols again.
        client = aioredis.Redis.from_url(lossy_redis)
        try:
            await client.config_set("appendonly", "yes")
            await client.config_set("maxmemory-policy", "noeviction")
        finally:
            await client.aclose()
        caplog.clear()
        assert (await stack.routes.startup()) is not None
        assert not [r for r in caplog.records if "not durable" in r.getMessage()]
        status, doc, _ = await _post(
            http, stack, "/register/options", {"name": "k"}, token=stack.token()
        )
        assert status == 200, doc


async def test_a_transaction_link_opens_only_in_the_session_it_was_made_for(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """The Check signs ``tx`` for one session. Moved into another sign-in of the same user
    (a link sent to a victim, a second browser) it is refused at the page and at the
    ceremony's start; without any ``tx`` the level is refused too: no ceremony starts."""
    async with (
        passkey_stack(tmp_path, redis_url, redis_prefix) as stack,
        aiohttp.ClientSession() as http,
    ):
        wire = TransactionRequest("POST", "localhost", "/wires/", b'{"amount": "10"}')
        now = int(stack.clock())
        mine = stack.links.sign_transaction(
            level="wire", session=stack.sk, request=wire, fields=("amount",), now=now
        )
        theirs = stack.links.sign_transaction(
            level="wire",
            session=session_key(ISS, stack.subject, "another-sign-in"),
            request=wire,
            fields=("amount",),
            now=now,
        )
        cookie = {"Cookie": f"stepup-token={stack.token()}"}
        link = stack.stepup_url("wire", rd="/wires/", tx=theirs)
        [ctx] = parse_qs(urlsplit(link).query)["ctx"]
        async with http.get(link, headers=cookie, allow_redirects=False) as r:
            assert r.status == 400
            assert "This step-up link cannot be used" in await r.text()
        for tx in (theirs, ""):
            status, doc, _ = await _post(
                http,
                stack,
                "/authenticate/options",
                {"level": "wire", "rd": "/wires/", "ctx": ctx, "tx": tx},
                token=stack.token(),
            )
            assert status == 400 and doc["reason"] == "transaction-invalid", doc
        # The same request signed for this session opens (the first load fixes its start).
        async with http.get(
            stack.stepup_url("wire", rd="/wires/", tx=mine), headers=cookie, allow_redirects=False
        ) as r:
            assert r.status == 303 and "st=" in r.headers["Location"]
