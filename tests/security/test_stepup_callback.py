"""Attacks on the step-up round trip (``/_stepup/start`` -> IdP -> ``/_stepup/callback``)
through the real Envoy, with real browsers (cookie jars), the dev IdP and TOTP.

The IdP misbehaves on request (TEST-ONLY knobs, ``authz.devidp.misbehave``): a weaker
``acr``, no ``auth_time``, a stale or future one, another ``iss``, another subject, a replayed
ID token. Each refusal is checked three ways: the callback answers 4xx, the completion
metric names the refusal (``stepup_authz_stepup_completions_total{result=...}``), and the
protected page still asks for step-up (no grant was written).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest

from authz.demo.stack import Stack

from .helpers import Browser, same_origin, set_knobs

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("honest_idp")]

STATE_COOKIE = "stepup-state"  # cookie_secure is off in the stack: no __Host- prefix


async def completions(stack: Stack) -> dict[tuple[str, str], float]:
    async with aiohttp.ClientSession() as s, s.get(f"{stack.service_http_url}/metrics") as r:
        text = await r.text()
    out: dict[tuple[str, str], float] = {}
    for m in re.finditer(
        r"^stepup_authz_stepup_completions_total\{([^}]*)\} (\S+)$", text, re.MULTILINE
    ):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        key = (labels["level"], labels["result"])
        out[key] = out.get(key, 0.0) + float(m.group(2))
    return out


class Results:
    """The completion results counted while a block runs."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.before: dict[tuple[str, str], float] = {}
        self.delta: dict[tuple[str, str], float] = {}

    async def __aenter__(self) -> Results:
        self.before = await completions(self.stack)
        return self

    async def __aexit__(self, *exc: object) -> None:
        after = await completions(self.stack)
        self.delta = {
            k: v - self.before.get(k, 0.0)
            for k, v in after.items()
            if v - self.before.get(k, 0.0) > 0
        }

    def __str__(self) -> str:
        return ", ".join(f"{lv}:{res}" for (lv, res) in sorted(self.delta)) or "none"


async def still_needs_step_up(b: Browser, path: str = "/accounts/1") -> bool:
    hop = await b.get(path)
    return hop.status == 302 and hop.location.startswith("/_stepup/start?")


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    q.update(params)
    return urlunsplit(parts._replace(query=urlencode(q)))


def drop_query(url: str, *names: str) -> str:
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items() if k not in names}
    return urlunsplit(parts._replace(query=urlencode(q)))


# -- state ---------------------------------------------------------------------------------------


async def test_callback_without_state(
    sec_stack: Stack, browser: Browser, outcome: Callable[[str, str], None]
) -> None:
    await browser.sign_in()
    callback = await browser.step_up_callback("/accounts/1")
    async with Results(sec_stack) as res:
        hop = await browser.get(drop_query(callback, "state"))
    outcome("400, result state-mismatch, no grant", f"{hop.status}, {res}")
    assert hop.status == 400 and res.delta == {("unknown", "state-mismatch"): 1}
    assert await still_needs_step_up(browser)


async def test_callback_from_a_foreign_browser(
    sec_stack: Stack,
    browser: Browser,
    make_browser: Callable[[], Browser],
    outcome: Callable[[str, str], None],
) -> None:
    """The victim's callback URL opened in another browser (no state cookie, or its own)
    is refused, and refusing it does not burn the victim's state."""
    await browser.sign_in()
    callback = await browser.step_up_callback("/accounts/1")
    stranger = make_browser()
    other = make_browser()
    other.user = "bob"
    await other.sign_in()
    await other.begin_step_up("/accounts/1")  # other now holds a state cookie of its own
    async with Results(sec_stack) as res:
        no_cookie = await stranger.get(callback)
        own_cookie = await other.get(callback)
    victim = await browser.get(callback)
    outcome(
        "400 and 400 (state-mismatch x2); the victim then completes (303)",
        f"{no_cookie.status}, {own_cookie.status} ({res}); victim {victim.status}",
    )
    assert no_cookie.status == 400 and own_cookie.status == 400
    assert res.delta == {("unknown", "state-mismatch"): 2}
    assert victim.status == 303 and victim.location == "/accounts/1"
    assert (await browser.get("/accounts/1")).status == 200
    assert await still_needs_step_up(other)


async def test_state_reused_after_success(
    sec_stack: Stack, browser: Browser, outcome: Callable[[str, str], None]
) -> None:
    await browser.sign_in()
    callback = await browser.step_up_callback("/accounts/1")
    state = parse_qs(urlsplit(callback).query)["state"][0].partition(".")[0]  # the id
    assert (await browser.get(callback)).status == 303
    async with Results(sec_stack) as res:
        replay = await browser.get(callback)  # the cookie was cleared on success
        replay_cookie = await browser.get(
            callback, headers={"Cookie": f"{STATE_COOKIE}={state}"}
        )  # ... so bring it back by hand
    outcome(
        "400 state-mismatch, then 400 state-invalid (used once)",
        f"{replay.status}, {replay_cookie.status} ({res})",
    )
    assert replay.status == 400 and replay_cookie.status == 400
    assert res.delta == {("unknown", "state-mismatch"): 1, ("unknown", "state-invalid"): 1}


# -- codes ---------------------------------------------------------------------------------------


async def test_code_replayed_into_a_fresh_state(
    sec_stack: Stack,
    browser: Browser,
    make_browser: Callable[[], Browser],
    outcome: Callable[[str, str], None],
) -> None:
    """A code already exchanged, injected into the attacker's own fresh round trip."""
    await browser.sign_in()
    callback = await browser.step_up_callback("/accounts/1")
    assert (await browser.get(callback)).status == 303
    code = parse_qs(urlsplit(callback).query)["code"][0]
    attacker = make_browser()
    await attacker.sign_in()  # alice's password, phished; not her second factor
    authorize = await attacker.begin_step_up("/accounts/1")
    state = parse_qs(urlsplit(authorize).query)["state"][0]
    async with Results(sec_stack) as res:
        hop = await attacker.get(with_query(callback, state=state, code=code))
    outcome("403 token-rejected (IdP: code already used); no grant", f"{hop.status} ({res})")
    assert hop.status == 403 and res.delta == {("elevated", "token-rejected"): 1}
    assert await still_needs_step_up(attacker)


async def test_unused_code_injected_into_another_flow(
    sec_stack: Stack,
    browser: Browser,
    make_browser: Callable[[], Browser],
    outcome: Callable[[str, str], None],
) -> None:
    """The victim's not-yet-used code in the attacker's round trip: PKCE binds the code to
    the victim's verifier, so the exchange fails; the code is spent, so the victim must
    start again (a safe failure)."""
    await browser.sign_in()
    callback = await browser.step_up_callback("/accounts/1")  # victim: not yet called
    code = parse_qs(urlsplit(callback).query)["code"][0]
    attacker = make_browser()
    await attacker.sign_in()
    authorize = await attacker.begin_step_up("/accounts/1")
    state = parse_qs(urlsplit(authorize).query)["state"][0]
    async with Results(sec_stack) as res:
        hop = await attacker.get(with_query(callback, state=state, code=code))
    victim = await browser.get(callback)
    outcome(
        "403 token-rejected (PKCE mismatch); no grant for the attacker; victim refused "
        "too (code spent)",
        f"{hop.status} ({res}); victim {victim.status}",
    )
    assert hop.status == 403 and res.delta == {("elevated", "token-rejected"): 1}
    assert await still_needs_step_up(attacker)
    assert victim.status == 403 and await still_needs_step_up(browser)


async def test_idp_error_response(
    sec_stack: Stack, browser: Browser, outcome: Callable[[str, str], None]
) -> None:
    await browser.sign_in()
    callback = await browser.step_up_callback("/accounts/1")
    async with Results(sec_stack) as res:
        hop = await browser.get(with_query(drop_query(callback, "code"), error="access_denied"))
        again = await browser.get(callback)  # the state was consumed by the error
    outcome("403 idp-error; the state is then spent (400)", f"{hop.status}, {again.status} ({res})")
    assert hop.status == 403 and again.status == 400
    assert res.delta == {
        ("elevated", "idp-error"): 1,
        ("unknown", "state-mismatch"): 1,
    } or res.delta == {("elevated", "idp-error"): 1, ("unknown", "state-invalid"): 1}


# -- a misbehaving IdP ------------------------------------------------------------------------

MISBEHAVIOUR: list[tuple[str, dict[str, Any], str, str]] = [
    # id, knobs, path, the completion result the service must record
    ("weaker-acr-pwd", {"acr": "pwd"}, "/accounts/1", "acr-insufficient"),
    ("acr-case-variant", {"acr": "MFA"}, "/accounts/1", "acr-insufficient"),
    ("acr-unknown-value", {"acr": "mfa-ish"}, "/accounts/1", "acr-insufficient"),
    ("no-auth-time", {"drop_auth_time": True}, "/accounts/1", "auth-time-missing"),
    ("auth-time-before-the-challenge", {"auth_time_offset_s": -120}, "/accounts/1", "auth-too-old"),
    ("auth-time-an-hour-old", {"auth_time_offset_s": -3600}, "/accounts/1", "auth-too-old"),
    ("auth-time-in-the-future", {"auth_time_offset_s": 3600}, "/accounts/1", "auth-time-future"),
    (
        "auth-time-future-on-a-level-without-max-age",
        {"auth_time_offset_s": 30 * 86_400},
        "/acronly/1",
        "auth-time-future",
    ),
    (
        "iss-mix-up-in-the-response",
        {"response_iss": "https://evil.example"},
        "/accounts/1",
        "issuer-mismatch",
    ),
    ("iss-of-the-tokens", {"token_iss": "TOKEN_ISS"}, "/accounts/1", "token-rejected"),
    ("id-token-for-another-subject", {"id_token_sub": "bob"}, "/accounts/1", "subject-mismatch"),
    (
        "id-token-for-another-client",
        {"id_token_aud": "other-client"},
        "/accounts/1",
        "token-rejected",
    ),
    ("nonce-not-ours", {"nonce": "attacker-chosen"}, "/accounts/1", "token-rejected"),
    (
        "id-token-replayed-from-an-earlier-round-trip",
        {"replay_id_token": True},
        "/accounts/1",
        "token-rejected",
    ),
]


@pytest.mark.parametrize(
    ("knobs", "path", "result"), [pytest.param(k, p, r, id=i) for i, k, p, r in MISBEHAVIOUR]
)
async def test_misbehaving_idp(
    sec_stack: Stack,
    browser: Browser,
    knobs: dict[str, Any],
    path: str,
    result: str,
    outcome: Callable[[str, str], None],
) -> None:
    knobs = {k: (sec_stack.idp_url + "/" if v == "TOKEN_ISS" else v) for k, v in knobs.items()}
    await browser.sign_in(path)
    authorize = await browser.begin_step_up(path)
    await set_knobs(sec_stack, **knobs)
    callback = await browser.idp_login(authorize, otp=True)
    level = "acronly" if path.startswith("/acronly/") else "elevated"
    async with Results(sec_stack) as res:
        hop = await browser.get(callback)
    await set_knobs(sec_stack)
    granted = not await still_needs_step_up(browser, path)
    outcome(
        f"403, result {result}, no grant",
        f"{hop.status} ({res}), {'GRANTED' if granted else 'no grant'}",
    )
    assert res.delta == {(level, result): 1}
    assert hop.status == 403
    assert not granted


async def test_another_user_signs_in_at_the_idp(
    sec_stack: Stack, browser: Browser, outcome: Callable[[str, str], None]
) -> None:
    """Alice's step-up completed by Bob (his password and TOTP) must not grant Alice."""
    await browser.sign_in()
    authorize = await browser.begin_step_up("/accounts/1")
    callback = await browser.idp_login(authorize, otp=True, user="bob")
    async with Results(sec_stack) as res:
        hop = await browser.get(callback)
    outcome("403 subject-mismatch, no grant", f"{hop.status} ({res})")
    assert hop.status == 403 and res.delta == {("elevated", "subject-mismatch"): 1}
    assert await still_needs_step_up(browser)


async def test_honest_idp_control(
    sec_stack: Stack, browser: Browser, outcome: Callable[[str, str], None]
) -> None:
    """The same flow with honest knobs is granted (so each refusal above is the knob's)."""
    await browser.sign_in("/acronly/1")
    callback = await browser.step_up_callback("/acronly/1")
    async with Results(sec_stack) as res:
        hop = await browser.get(callback)
    outcome("303 success, then 200", f"{hop.status} ({res})")
    assert hop.status == 303 and res.delta == {("acronly", "success"): 1}
    assert (await browser.get("/acronly/1")).status == 200


# -- open redirects --------------------------------------------------------------------------

OPEN_REDIRECTS = [
    "//evil.example",
    "//evil.example/path",
    "/\\evil.example",
    "\\\\evil.example",
    "https://evil.example",
    "https:evil.example",
    "http:/evil.example",
    "HTTPS://evil.example",
    "/%09/evil.example",
    "/%0a/evil.example",
    "/%0d%0aLocation:%20https://evil.example",
    "/%2F%2Fevil.example",
    "/%2f%5cevil.example",
    "/%5Cevil.example",
    "%2F%2Fevil.example",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "//user@evil.example",
    "//evil.example@app.example",
    "/\t/evil.example",
    "/ /evil.example",
    "//%65vil.example",
    "/\\/evil.example",
    "///evil.example",
    "evil.example",
    "",
    "/" + "a" * 3000,
]
SAME_ORIGIN_OK = ["/@evil.example", "/accounts/1?x=//evil.example", "/.//evil.example"]


@pytest.mark.parametrize("rd", OPEN_REDIRECTS + SAME_ORIGIN_OK)
async def test_login_return_path(
    sec_stack: Stack, browser: Browser, rd: str, outcome: Callable[[str, str], None]
) -> None:
    hop = await browser.get("/_stepup/login", params={"rd": rd})
    assert hop.status == 302
    callback = await browser.idp_login(hop.location, otp=False)
    hop = await browser.get(callback)
    expected = rd if rd in SAME_ORIGIN_OK else "/"
    outcome(f"303 to {expected!r} (same origin)", f"{hop.status} to {hop.location!r}")
    assert hop.status == 303
    assert same_origin(hop.location), hop.location
    assert hop.location == expected


@pytest.mark.parametrize(
    "rd",
    [
        "//evil.example",
        "/\\evil.example",
        "/%09/evil.example",
        "https:evil.example",
        "javascript:alert(1)",
        "//user@evil.example",
    ],
)
async def test_step_up_return_path(
    sec_stack: Stack, browser: Browser, rd: str, outcome: Callable[[str, str], None]
) -> None:
    await browser.sign_in()
    hop = await browser.get("/accounts/1")
    start = with_query(hop.location, rd=rd)  # keep the signed ctx, swap the return path
    hop = await browser.get(start)
    assert hop.status == 302
    callback = await browser.idp_login(hop.location, otp=True)
    hop = await browser.get(callback)
    outcome("303 to '/' (granted, but never off-site)", f"{hop.status} to {hop.location!r}")
    assert hop.status == 303 and hop.location == "/"


# -- the start link ------------------------------------------------------------------------


async def test_login_csrf_callback_in_the_victims_browser(
    sec_stack: Stack,
    browser: Browser,
    make_browser: Callable[[], Browser],
    outcome: Callable[[str, str], None],
) -> None:
    """Login CSRF: the attacker signs in as bob in their own browser and makes the victim's
    browser open the callback; without the attacker's state cookie it is refused, so the
    victim is never signed in as the attacker."""
    attacker = make_browser()
    attacker.user = "bob"
    hop = await attacker.get("/_stepup/login", params={"rd": "/accounts/1"})
    callback = await attacker.idp_login(hop.location, otp=False)
    async with Results(sec_stack) as res:
        hop = await browser.get(callback)
    token_cookie = "SET" if browser.cookie("stepup-token") else "none"
    outcome(
        "400 state-mismatch; the victim gets no token cookie",
        f"{hop.status} ({res}); token cookie {token_cookie}",
    )
    assert hop.status == 400 and browser.cookie("stepup-token") is None
    assert res.delta == {("unknown", "state-mismatch"): 1}


@pytest.mark.parametrize("level", ["public", "standard", "ops", "nope", "", "ELEVATED"])
async def test_start_for_a_level_without_evidence(
    sec_stack: Stack, browser: Browser, level: str, outcome: Callable[[str, str], None]
) -> None:
    await browser.sign_in()
    hop = await browser.get("/_stepup/start", params={"level": level, "rd": "/"})
    outcome("400 unknown step-up level", str(hop.status))
    assert hop.status == 400


@pytest.mark.parametrize("how", ["flip-a-byte", "other-level", "missing", "forged-mac"])
async def test_start_link_context_tampering(
    sec_stack: Stack, browser: Browser, how: str, outcome: Callable[[str, str], None]
) -> None:
    """The start link carries the device and IP the Check saw, HMAC-signed: an edited,
    foreign or missing context is refused rather than binding the grant to something else."""
    import base64
    import json as _json

    await browser.sign_in()
    hop = await browser.get("/accounts/1")
    q = {k: v[0] for k, v in parse_qs(urlsplit(hop.location).query).items()}
    ctx = q["ctx"]
    body, _, mac = ctx.partition(".")
    if how == "flip-a-byte":
        q["ctx"] = body[:-1] + ("A" if body[-1] != "A" else "B") + "." + mac
    elif how == "other-level":
        q["level"] = "high"
    elif how == "missing":
        del q["ctx"]
    else:
        doc = _json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        doc["ip"] = "10.9.9.9"
        forged = base64.urlsafe_b64encode(_json.dumps(doc).encode()).rstrip(b"=").decode()
        q["ctx"] = f"{forged}.{mac}"
    hop = await browser.get("/_stepup/start?" + urlencode(q))
    outcome("400 step-up link refused; no state cookie set", str(hop.status))
    assert hop.status == 400 and browser.cookie(STATE_COOKIE) is None


@pytest.mark.parametrize(
    "headers",
    [{"Host": "evil.example"}, {"X-Forwarded-Host": "evil.example"}],
    ids=["host", "x-forwarded-host"],
)
async def test_redirect_uri_is_configured_not_reflected(
    sec_stack: Stack, browser: Browser, headers: dict[str, str], outcome: Callable[[str, str], None]
) -> None:
    """The IdP is told to send the code to the configured public URL, whatever Host the
    client sent: a forged Host cannot divert the authorization code."""
    hop = await browser.get("/_stepup/login", params={"rd": "/"}, headers=headers)
    if "Host" in headers:  # not a host Envoy serves: 404, nothing reaches the service
        outcome("404 from Envoy, or the configured redirect_uri", f"{hop.status} {hop.location}")
        assert hop.status == 404 and not hop.location
        return
    q = parse_qs(urlsplit(hop.location).query)
    outcome(
        f"redirect_uri = {sec_stack.envoy_url}/_stepup/callback",
        f"redirect_uri = {q['redirect_uri'][0]}",
    )
    assert q["redirect_uri"] == [f"{sec_stack.envoy_url}/_stepup/callback"]
