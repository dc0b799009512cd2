"""What a user sees when a step-up cannot go on: the page says why a second factor is
asked in the policy's own words, carries the reference that is in the log, and its button
leads back to the page the user wanted -- also after Back, a reload of the callback, or a
sign-in page left open past the state's lifetime (authz/stepup/wayback.py). The way back
is a signed hint, only ever a same-origin path."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp.test_utils import TestClient, TestServer

from authz.check.redirects import Redirects
from authz.check.response import denial
from authz.core.attributes import RequestAttributes
from authz.core.decision import Decision, failed, refused
from authz.core.policy import load_policy
from authz.core.reasons import Reason
from authz.stepup.pages import why_text
from authz.stepup.wayback import WayBackSigner
from tests.builders import NOW, StepupEnv, id_token, identity, stepup_env

STATE_COOKIE = "__Host-stepup-state"
TOKEN = "alice-access-token"

POLICY = """\
levels:
  public:   {public: true}
  standard: {}
  elevated:
    acr: [mfa, phr]
    max_age: 900
    title: Two-step sign-in
    description: your password and a code from your authenticator app
  high: {acr: [phr], max_age: 300}
default_level: standard
routes:
  - {path: /, level: public}
  - {path_prefix: /accounts/, methods: [GET], level: elevated, title: Your accounts,
     description: 'Balances are shown only after a second factor.'}
  - {path_prefix: /wires/, level: high}
"""


@pytest.fixture
def env(tmp_path: Path) -> StepupEnv:
    (tmp_path / "policy.yaml").write_text(POLICY)
    e = stepup_env(tmp_path)
    e.tokens.access[TOKEN] = identity()
    return e


@pytest.fixture
async def client(env: StepupEnv) -> AsyncIterator[TestClient[object, object]]:
    async with TestClient(TestServer(env.app.build())) as c:
        yield c  # type: ignore[misc]


async def start(client: TestClient[object, object], env: StepupEnv, rd: str) -> tuple[str, str]:
    """/start for /accounts/...; (the state sent to the IdP, the state cookie)."""
    resp = await client.get(
        "/_stepup/start",
        params={"level": "elevated", "rd": rd, "ctx": env.link("elevated", ip="10.0.0.7")},
        headers={"Cookie": f"__Host-stepup-token={TOKEN}"},
        allow_redirects=False,
    )
    assert resp.status == 302, await resp.text()
    state = parse_qs(urlsplit(resp.headers["Location"]).query)["state"][0]
    return state, resp.cookies[STATE_COOKIE].value


async def callback(
    client: TestClient[object, object], state: str, cookie: str | None
) -> tuple[int, str, dict[str, str]]:
    headers = {"x-stepup-peer-address": "10.0.0.7"}
    if cookie is not None:
        headers["Cookie"] = f"{STATE_COOKIE}={cookie}"
    resp = await client.get(
        "/_stepup/callback",
        params={"state": state, "code": "the-code"},
        headers=headers,
        allow_redirects=False,
    )
    return resp.status, await resp.text(), dict(resp.headers)


def button(page: str) -> tuple[str, str]:
    found = re.search(r'<a class="button" href="([^"]*)">([^<]*)</a>', page)
    assert found is not None, page
    return found.group(1).replace("&amp;", "&"), found.group(2)


def reference(page: str) -> str:
    found = re.search(r"Reference: <code>([0-9A-Z]{26})</code>", page)
    assert found is not None, page
    return found.group(1)


async def test_reloading_the_callback_after_success_leads_back_to_the_page_wanted(
    client: TestClient[object, object], env: StepupEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env.tokens.next_id_token = id_token()
    state, cookie = await start(client, env, "/accounts/7?tab=2")
    status, _, headers = await callback(client, state, cookie)
    assert (status, headers["Location"]) == (303, "/accounts/7?tab=2")
    caplog.set_level(logging.INFO)
    # the reload: the cookie was cleared on success, the state is spent
    for cookie_now in (None, cookie):
        status, page, _ = await callback(client, state, cookie_now)
        assert status == 400
        assert "Sign-in expired" not in page and "already used" in page
        assert button(page) == ("/accounts/7?tab=2", "Continue to \u201cYour accounts\u201d")
        assert (
            "\u201cYour accounts\u201d asks for Two-step sign-in: your password and a code "
            "from your authenticator app. Balances are shown only after a second factor."
        ) in page
        ref = reference(page)
        (line,) = [r for r in caplog.records if getattr(r, "decision_id", None) == ref]
        # the log line's reason is the precise one (a replay of a used state), its result the
        # metric's coarse label
        assert line.reason is Reason.STATE_REPLAYED  # type: ignore[attr-defined]
        assert line.result in (Reason.STATE_MISMATCH, Reason.STATE_INVALID)  # type: ignore[attr-defined]


async def test_a_sign_in_page_left_open_past_the_state_ttl_restarts_at_the_page_wanted(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    state, cookie = await start(client, env, "/accounts/7")
    env.clock.advance(env.settings.stepup.state_ttl_s + 60)  # the state and its cookie expire
    for cookie_now in (None, cookie):
        status, page, _ = await callback(client, state, cookie_now)
        assert status == 400 and button(page)[0] == "/accounts/7", page
    assert env.oidc.exchanged == []  # nothing was exchanged for a spent state


async def test_back_into_an_older_sign_in_page_restarts_at_its_own_page(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    """Back from the step-up page into the first one: its callback comes with the newer
    state's cookie."""
    old_state, _ = await start(client, env, "/accounts/1")
    _, new_cookie = await start(client, env, "/accounts/2")
    status, page, _ = await callback(client, old_state, new_cookie)
    assert status == 400 and button(page)[0] == "/accounts/1", page


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.replace(s.split(".")[1], s.split(".")[1][:-2] + "AA"),  # the hint
        lambda s: s.split(".")[0] + "." + s.split(".")[1] + ".",  # no MAC
        lambda s: "another-id." + s.partition(".")[2],  # moved to another state id
    ],
    ids=["edited-hint", "no-mac", "another-state-id"],
)
async def test_an_edited_way_back_is_ignored(
    client: TestClient[object, object], env: StepupEnv, edit: object
) -> None:
    state, _ = await start(client, env, "/accounts/7")
    status, page, _ = await callback(client, edit(state), None)  # type: ignore[operator]
    assert status == 400 and "Sign-in expired" in page
    assert button(page)[0] == "/"


@pytest.mark.parametrize(
    "path", ["https://evil.example/", "//evil.example/x", "/\\evil.example", "/%09/evil"]
)
async def test_a_signed_way_back_to_another_origin_still_goes_to_the_landing_page(
    client: TestClient[object, object], env: StepupEnv, path: str
) -> None:
    """Even a hint signed with the service's key (a bug elsewhere, a leaked key) is only
    ever a same-origin path: the callback checks it again."""
    state = WayBackSigner(env.signer).seal("some-state", path, "elevated", NOW)
    status, page, _ = await callback(client, state, None)
    assert status == 400 and button(page)[0] == "/", page


async def test_a_too_old_way_back_is_ignored(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    old = WayBackSigner(env.signer).seal("some-state", "/accounts/7", "elevated", NOW - 86_401)
    status, page, _ = await callback(client, old, None)
    assert status == 400 and button(page)[0] == "/"


async def test_a_refused_step_up_says_why_in_the_policys_words(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    env.tokens.next_id_token = id_token(acr="pwd", amr=("pwd",))
    state, cookie = await start(client, env, "/accounts/7")
    status, page, _ = await callback(client, state, cookie)
    assert status == 403
    assert "did not use a strong enough method" in page
    assert "\u201cYour accounts\u201d asks for Two-step sign-in" in page
    assert button(page) == ("/accounts/7", "Try again")
    assert '<a class="home" href="/">Go to the start page</a>' in page
    reference(page)


async def test_another_user_signing_in_is_told_so(
    client: TestClient[object, object], env: StepupEnv
) -> None:
    env.tokens.next_id_token = id_token("bob")
    state, cookie = await start(client, env, "/accounts/7")
    status, page, _ = await callback(client, state, cookie)
    assert status == 403 and "different user" in page, page
    assert "required strength" not in page


def test_why_text_has_defaults_without_titles() -> None:
    policy = load_policy(
        {
            "levels": {"standard": {}, "high": {"acr": ["phr"], "max_age": 300}},
            "default_level": "standard",
            "routes": [{"path_prefix": "/wires/", "level": "high"}],
        }
    )
    level = policy.by_name["high"]
    assert why_text(level, policy.routes[0]) == (
        "This page asks for high: a stronger sign-in than a password alone, within the "
        "last 5 minutes."
    )
    assert why_text(None, None) == ""


# -- the Check's refusals: a page for browsers, JSON for API clients ------------------------


def _attrs(accept: str, path: str = "/wires/7", query: str = "") -> RequestAttributes:
    return RequestAttributes(
        method="GET",
        scheme="https",
        host="app.test",
        path=path,
        query=query,
        headers={"accept": accept},
        source_ip=None,
    )


@pytest.mark.parametrize(
    ("decision", "status", "words"),
    [
        (refused(Reason.SESSION_REVOKED), 403, "Signed out"),
        (failed(Reason.SESSION_STORE_UNAVAILABLE), 403, "Temporarily unavailable"),
    ],
    ids=["forbidden", "error"],
)
def test_a_browser_gets_a_page_and_an_api_client_json(
    decision: Decision, status: int, words: str
) -> None:
    redirects = Redirects()
    got, headers, body = denial(
        decision,
        _attrs("text/html,*/*", query="a=1"),
        "01J0DECISION",
        redirects=redirects,
        error_status=403,
    )
    named = dict(headers)
    assert got == status and named["content-type"].startswith("text/html")
    assert named["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in named["content-security-policy"]
    assert words in body and "Reference: <code>01J0DECISION</code>" in body
    assert button(body) == ("/wires/7?a=1", "Try again")  # the same page, once more
    got, headers, body = denial(
        decision,
        _attrs("application/json"),
        "01J0DECISION",
        redirects=redirects,
        error_status=403,
    )
    assert dict(headers)["content-type"] == "application/json"
    assert json.loads(body)["decision_id"] == "01J0DECISION"


def test_the_pages_way_back_is_only_ever_a_same_origin_path() -> None:
    _, _, body = denial(
        refused(Reason.SESSION_REVOKED),
        _attrs("text/html", path="//evil.example/x"),
        "01J0DECISION",
        redirects=Redirects(),
        error_status=403,
    )
    assert button(body)[0] == "/"
