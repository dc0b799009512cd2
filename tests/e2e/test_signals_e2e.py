"""Device, IP and behavioural signals through the real Envoy: a new device forces step-up,
a bound grant is refused from another device or IP, X-Forwarded-For spoofing does not move
the client IP, velocity challenges, a revocation through the API applies on the next
request, and a shadow rule changes nothing but is counted."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import jwt
import pytest
import redis
from multidict import CIMultiDict

from authz.check.devices import cookie_device_id
from authz.demo.stack import Stack
from tests.builders import password_token

from .conftest import make_stack
from .test_stepup_flow import Browser

pytestmark = pytest.mark.e2e

POLICY = """\
levels:
  standard: {}
  elevated: {acr: [mfa], max_age: 900}
  bound:    {acr: [mfa], max_age: 900, bind: [device, ip]}
  high:     {acr: [phr], max_age: 300}
routes:
  - {path_prefix: /accounts/, level: elevated}
  - {path_prefix: /vault/, level: bound}
  - {path_prefix: /trades/, level: elevated}
default_level: standard
signals:
  sensitive_level: elevated
  velocity: {window_s: 60, max: 12}
rules:
  - {name: blocked, when: {ip_in: [198.51.100.0/24]}, deny: ip-blocked}
  - {name: new-device, when: {device: unknown, level_at_least: standard}, raise_to: elevated}
  - {name: too-fast, when: {signals_any: [velocity]}, raise_to: high}
  - {name: offsite, when: {ip_not_in: [10.0.0.0/8]}, raise_to: high, mode: shadow}
"""
API_SECRET = "e2e-api-secret-0123456789"


@pytest.fixture(scope="module")
def sig_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("signals")
    (d / "policy.yaml").write_text(POLICY)
    (d / "api-secret").write_text(API_SECRET)
    with make_stack(
        tmp_path_factory,
        policy_file=d / "policy.yaml",
        extra_settings={
            "api": {
                "enabled": True,
                "callers": [
                    {
                        "name": "helpdesk",
                        "bearer_secret_file": str(d / "api-secret"),
                        "operations": ["list", "revoke"],
                    }
                ],
            },
        },
    ) as s:
        yield s


@pytest.fixture
async def browser(sig_stack: Stack) -> AsyncIterator[Browser]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        yield Browser(s, sig_stack)


async def token(
    stack: Stack, *, otp: bool = False, sid: str | None = None, user: str = "alice"
) -> str:
    return await password_token(stack.idp_url, user, otp=otp, **({"sid": sid} if sid else {}))


async def get(
    stack: Stack,
    path: str,
    tok: str | None = None,
    *,
    local: str | None = None,
    headers: dict[str, str] | None = None,
    raw_headers: list[tuple[str, str]] | None = None,
) -> tuple[int, dict[str, str]]:
    h = dict(headers or {})
    if tok:
        h["Authorization"] = f"Bearer {tok}"
    md = CIMultiDict(h)
    for k, v in raw_headers or ():  # repeated header names, as a client may send them
        md.add(k, v)
    connector = aiohttp.TCPConnector(local_addr=(local, 0) if local else None)
    async with (
        aiohttp.ClientSession(connector=connector) as s,
        s.get(stack.envoy_url + path, headers=md, allow_redirects=False) as r,
    ):
        return r.status, dict(r.headers)


def metric(stack: Stack, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{stack.service_http_url}/metrics", timeout=5) as r:  # noqa: S310
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_new_device_forces_step_up_then_is_known(sig_stack: Stack, browser: Browser) -> None:
    await browser.sign_in("/news")  # the sign-in itself: standard, but no device yet
    status, headers, _ = await browser.get("/news")
    # no device identity: the new-device rule raises standard to elevated
    assert status == 302 and headers["Location"].startswith("/_stepup/start?level=elevated")
    await browser.step_up("/news")  # TOTP; the callback sets the device cookie
    device = [c for c in browser.s.cookie_jar if c.key == "stepup-device"]
    assert len(device) == 1
    status, _, body = await browser.get("/news")
    assert status == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-stepup-level"] == "standard"  # a known device now
    assert seen["x-stepup-risk"].isdigit()
    # The audit trail names the device by a hash of its cookie, never by the cookie.
    stream = redis.Redis.from_url(sig_stack.redis_url)
    try:
        records = [json.loads(f[b"r"]) for _, f in stream.xrange(sig_stack.audit_stream_key)]
    finally:
        stream.close()
    assert any(r.get("device") == cookie_device_id(str(device[0].value)) for r in records)
    assert not any(str(device[0].value) in json.dumps(r) for r in records)


async def test_bound_grant_is_refused_from_another_device_and_ip(sig_stack: Stack) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        b = Browser(s, sig_stack)
        await b.sign_in("/vault/1")
        await b.step_up("/vault/1")
        status, _, _ = await b.get("/vault/1")
        assert status == 200
        cookies = {c.key: c.value for c in s.cookie_jar}
    tok, dev = cookies["stepup-token"], cookies["stepup-device"]
    same = {"Cookie": f"stepup-token={tok}; stepup-device={dev}", "Accept": "text/html"}
    # the same device and IP: honoured
    assert (await get(sig_stack, "/vault/1", headers=same))[0] == 200
    # another device (a different device cookie) on the same IP: step-up again
    other = {"Cookie": f"stepup-token={tok}; stepup-device={'z' * 32}"}
    status, headers = await get(sig_stack, "/vault/1", headers=other)
    assert (status, headers["x-stepup-reason"]) == (401, "grant-bound-elsewhere")
    # the same device from another address (127.0.0.2 is loopback too): step-up again
    status, headers = await get(
        sig_stack,
        "/vault/1",
        headers={"Cookie": f"stepup-token={tok}; stepup-device={dev}"},
        local="127.0.0.2",
    )
    assert (status, headers["x-stepup-reason"]) == (401, "grant-bound-elsewhere")


@pytest.mark.parametrize(
    "forged",
    [
        {"X-Forwarded-For": "198.51.100.7"},
        {"X-Forwarded-For": "198.51.100.7, 10.0.0.1"},
        {"X-Real-IP": "198.51.100.7"},
        {"X-Forwarded-For": "not-an-ip, 198.51.100.7"},
    ],
)
async def test_forged_forwarding_headers_do_not_move_the_client_ip(
    sig_stack: Stack, forged: dict[str, str]
) -> None:
    # The rule denies 198.51.100.0/24; the client is really 127.0.0.1 and is not denied.
    tok = await token(sig_stack, otp=True)
    status, headers = await get(sig_stack, "/news", tok, headers=forged)
    assert headers.get("x-stepup-reason") != "ip-blocked"
    assert status == 200


async def test_several_xff_headers_do_not_move_the_client_ip(sig_stack: Stack) -> None:
    tok = await token(sig_stack, otp=True)
    status, headers = await get(
        sig_stack,
        "/news",
        tok,
        raw_headers=[("X-Forwarded-For", "198.51.100.7"), ("X-Forwarded-For", "198.51.100.8")],
    )
    assert status == 200 and headers.get("x-stepup-reason") != "ip-blocked"


async def test_velocity_over_the_threshold_challenges(sig_stack: Stack) -> None:
    tok = await token(sig_stack, otp=True, sid="velocity-session", user="bob")
    statuses = [(await get(sig_stack, "/trades/1", tok))[0] for _ in range(15)]
    # twelve sensitive checks in the window are fine; the 13th raises to "high" (acr phr)
    assert statuses[:12] == [200] * 12
    assert statuses[12:] == [401] * 3
    _, headers = await get(sig_stack, "/trades/1", tok)
    assert 'acr_values="phr"' in headers["WWW-Authenticate"]


async def test_revocation_through_the_api_applies_on_the_next_request(
    sig_stack: Stack, tmp_path: Path
) -> None:
    tok = await token(sig_stack, otp=True, sid="revoke-me")
    assert (await get(sig_stack, "/accounts/1", tok))[0] == 200
    claims = jwt.decode(tok, options={"verify_signature": False})
    secret = tmp_path / "secret"
    secret.write_text(API_SECRET)
    cli = [sys.executable, "-m", "authz.cli", "sessions"]
    common = [
        "--target",
        sig_stack.api_target,
        "--user",
        claims["iss"],
        claims["sub"],
        "--token-file",
        str(secret),
    ]

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, [*cli, *args], capture_output=True, text=True, timeout=30, check=False
        )

    listed = await run("list", *common)
    assert listed.returncode == 0, listed.stderr
    revoke = await run("revoke", *common, "--session", "revoke-me", "--reason", "e2e")
    assert revoke.returncode == 0, revoke.stderr
    status, headers = await get(sig_stack, "/accounts/1", tok)
    assert (status, headers["x-stepup-reason"]) == (401, "session-revoked")
    # a wrong API secret is refused
    secret.write_text("wrong-secret-but-long-enough")
    denied = await run("revoke-user", *common)
    assert denied.returncode != 0


async def test_a_shadow_rule_changes_nothing_but_is_counted(sig_stack: Stack) -> None:
    before = metric(sig_stack, 'stepup_authz_shadow_matches_total{rule="offsite"}')
    tok = await token(sig_stack, otp=True)
    status, _ = await get(sig_stack, "/news", tok)
    # 127.0.0.1 is not in 10.0.0.0/8: "offsite" matches, but only in shadow: still allowed
    assert status == 200
    assert metric(sig_stack, 'stepup_authz_shadow_matches_total{rule="offsite"}') >= before + 1
