"""The development OIDC provider, served on a real loopback port and driven over HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlsplit

import aiohttp
import jwt
import pyotp
import pytest

from authz.devidp import (
    ALICE_TOTP_SECRET,
    BOB_TOTP_SECRET,
    DevClient,
    DevIdpConfig,
    base_url,
    bind,
    running,
)
from authz.devidp.config import load_file
from authz.errors import ConfigError
from tests.builders import FakeClock

pytestmark = pytest.mark.integration

CLIENT_ID = "stepup-authz"
CLIENT_SECRET = "dev-secret"
REDIRECT_URI = "http://127.0.0.1:8080/_stepup/callback"


def basic(client_id: str, secret: str) -> dict[str, str]:
    """client_secret_basic (RFC 6749 section 2.3.1), built by hand: aiohttp.BasicAuth is
    deprecated in aiohttp 3.14."""
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


BASIC = basic(CLIENT_ID, CLIENT_SECRET)


@dataclass
class Idp:
    url: str
    clock: FakeClock
    http: aiohttp.ClientSession

    def totp(self, secret: str = ALICE_TOTP_SECRET) -> str:
        return pyotp.TOTP(secret).at(self.clock.now)

    def wrong_totp(self, secret: str = ALICE_TOTP_SECRET) -> str:
        valid = {pyotp.TOTP(secret).at(self.clock.now + d) for d in (-30, 0, 30)}
        return next(c for c in ("000000", "111111", "222222", "333333") if c not in valid)


@pytest.fixture
async def idp() -> AsyncIterator[Idp]:
    # Near real time, so pyjwt's own exp/iat checks still pass on the minted tokens.
    clock = FakeClock(int(time.time()))
    sock = bind("127.0.0.1", 0)
    url = base_url(sock)
    config = DevIdpConfig(
        issuer=url,
        clients={CLIENT_ID: DevClient(CLIENT_SECRET, (REDIRECT_URI,))},
        clock=clock,
    )
    async with (
        running(config, sock),
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
    ):
        yield Idp(url, clock, http)


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def auth_params(challenge: str, **extra: str) -> dict[str, str]:
    params = {
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "response_type": "code",
        "scope": "openid profile",
        "state": "st-1",
        "nonce": "n-1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(extra)
    return {k: v for k, v in params.items() if v != ""}


async def authorize(idp: Idp, params: dict[str, str]) -> aiohttp.ClientResponse:
    resp = await idp.http.get(f"{idp.url}/authorize", params=params, allow_redirects=False)
    await resp.read()
    return resp


def request_id(html: str) -> str:
    match = re.search(r'name="request_id" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


async def submit(idp: Idp, rid: str, **fields: str) -> aiohttp.ClientResponse:
    form = {"request_id": rid, **fields}
    resp = await idp.http.post(f"{idp.url}/authorize", data=form, allow_redirects=False)
    await resp.read()
    return resp


def callback(resp: aiohttp.ClientResponse) -> dict[str, str]:
    """The query of a redirect to the client's callback, one value per name."""
    assert resp.status == 302
    location = resp.headers["Location"]
    assert location.startswith(REDIRECT_URI + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def token(
    idp: Idp, data: dict[str, str], *, use_basic: bool = True
) -> aiohttp.ClientResponse:
    resp = await idp.http.post(f"{idp.url}/token", data=data, headers=BASIC if use_basic else None)
    await resp.read()
    return resp


async def exchange(idp: Idp, code: str, verifier: str) -> aiohttp.ClientResponse:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
    }
    return await token(idp, data)


async def login(
    idp: Idp, verifier_challenge: tuple[str, str], *, otp: bool = True, **extra: str
) -> dict[str, str]:
    """A full browser sign-in; returns the callback query."""
    _, challenge = verifier_challenge
    if otp:
        extra.setdefault("acr_values", "mfa")
    form_page = await authorize(idp, auth_params(challenge, **extra))
    assert form_page.status == 200
    fields = {"username": "alice", "password": "alice-password"}
    if otp:
        fields["otp"] = idp.totp()
    return callback(await submit(idp, request_id(await form_page.text()), **fields))


async def verify(idp: Idp, token_: str, audience: str) -> tuple[dict[str, Any], dict[str, Any]]:
    async with idp.http.get(f"{idp.url}/jwks") as resp:
        jwks = await resp.json()
    header = jwt.get_unverified_header(token_)
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    key = jwt.PyJWK(jwk).key
    # Leeway: the fake clock runs ahead of the real one when a test moves it (max_age).
    claims = jwt.decode(
        token_, key, algorithms=["RS256"], audience=audience, issuer=idp.url, leeway=600
    )
    return header, claims


async def error_of(resp: aiohttp.ClientResponse) -> str:
    body = await resp.json()
    assert set(body) == {"error", "error_description"}
    return str(body["error"])


# -- discovery and keys -------------------------------------------------------------------


async def test_discovery_and_jwks(idp: Idp) -> None:
    async with idp.http.get(f"{idp.url}/.well-known/openid-configuration") as resp:
        assert resp.status == 200
        meta = await resp.json()
    assert meta["issuer"] == idp.url
    assert meta["authorization_endpoint"] == f"{idp.url}/authorize"
    assert meta["token_endpoint"] == f"{idp.url}/token"
    assert meta["jwks_uri"] == f"{idp.url}/jwks"
    assert meta["response_types_supported"] == ["code"]
    assert meta["grant_types_supported"] == ["authorization_code", "password"]
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["acr_values_supported"] == ["pwd", "mfa"]
    assert meta["id_token_signing_alg_values_supported"] == ["RS256"]
    assert meta["token_endpoint_auth_methods_supported"] == [
        "client_secret_basic",
        "client_secret_post",
    ]
    assert "openid" in meta["scopes_supported"]
    assert {"acr", "amr", "auth_time", "sid", "nonce"} <= set(meta["claims_supported"])
    assert meta["authorization_response_iss_parameter_supported"] is True

    async with idp.http.get(f"{idp.url}/jwks") as resp:
        (key,) = (await resp.json())["keys"]
    assert set(key) == {"kty", "n", "e", "kid", "alg", "use"}
    assert (key["kty"], key["alg"], key["use"], key["e"]) == ("RSA", "RS256", "sig", "AQAB")
    n = int.from_bytes(base64.urlsafe_b64decode(key["n"] + "=" * (-len(key["n"]) % 4)), "big")
    assert n.bit_length() == 2048


# -- authorization code flow -------------------------------------------------------------


async def test_code_flow_with_pkce_and_totp(idp: Idp) -> None:
    verifier, challenge = pkce()
    page = await authorize(idp, auth_params(challenge, acr_values="mfa", login_hint="alice"))
    assert page.status == 200
    html = await page.text()
    assert 'name="otp"' in html
    assert 'id="username" name="username" value="alice"' in html
    assert challenge not in html and REDIRECT_URI not in html  # kept server-side

    resp = await submit(
        idp, request_id(html), username="alice", password="alice-password", otp=idp.totp()
    )
    query = callback(resp)
    assert set(query) == {"code", "state", "iss"}
    assert query["state"] == "st-1"
    assert query["iss"] == idp.url
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("devidp_session=")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie

    tok = await exchange(idp, query["code"], verifier)
    assert tok.status == 200
    assert tok.headers["Cache-Control"] == "no-store"
    body = await tok.json()
    assert set(body) == {"access_token", "id_token", "token_type", "expires_in", "scope"}
    assert (body["token_type"], body["expires_in"], body["scope"]) == (
        "Bearer",
        3600,
        "openid profile",
    )

    id_header, idt = await verify(idp, body["id_token"], CLIENT_ID)
    assert id_header["typ"] == "JWT" and id_header["alg"] == "RS256"
    assert idt["iss"] == idp.url
    assert idt["sub"] == "alice"
    assert idt["aud"] == CLIENT_ID and idt["azp"] == CLIENT_ID
    assert idt["nonce"] == "n-1"
    assert idt["acr"] == "mfa"
    assert idt["amr"] == ["pwd", "otp"]
    assert idt["auth_time"] == int(idp.clock.now)
    assert idt["exp"] == idt["iat"] + 3600
    assert (idt["name"], idt["email"]) == ("Alice Example", "alice@example.com")
    at_digest = hashlib.sha256(body["access_token"].encode()).digest()[:16]
    assert idt["at_hash"] == base64.urlsafe_b64encode(at_digest).rstrip(b"=").decode()

    at_header, at = await verify(idp, body["access_token"], "stepup-demo")
    assert at_header["typ"] == "at+jwt"
    assert at_header["kid"] == id_header["kid"]
    assert at["sub"] == "alice"
    assert at["client_id"] == CLIENT_ID
    assert at["scope"] == "openid profile"
    assert (at["acr"], at["amr"], at["auth_time"]) == ("mfa", ["pwd", "otp"], idt["auth_time"])
    assert at["sid"] == idt["sid"] and len(at["sid"]) >= 16
    assert at["jti"]


async def test_code_replay_is_invalid_grant(idp: Idp) -> None:
    verifier, challenge = pkce()
    query = await login(idp, (verifier, challenge))
    assert (await exchange(idp, query["code"], verifier)).status == 200
    again = await exchange(idp, query["code"], verifier)
    assert again.status == 400
    assert await error_of(again) == "invalid_grant"


async def test_wrong_code_verifier_is_invalid_grant_and_burns_the_code(idp: Idp) -> None:
    verifier, challenge = pkce()
    query = await login(idp, (verifier, challenge))
    other_verifier, _ = pkce()
    bad = await exchange(idp, query["code"], other_verifier)
    assert bad.status == 400
    assert bad.headers["Cache-Control"] == "no-store"
    assert await error_of(bad) == "invalid_grant"
    assert await error_of(await exchange(idp, query["code"], verifier)) == "invalid_grant"


async def test_redirect_uri_must_match_at_token_endpoint(idp: Idp) -> None:
    verifier, challenge = pkce()
    query = await login(idp, (verifier, challenge))
    data = {
        "grant_type": "authorization_code",
        "code": query["code"],
        "redirect_uri": REDIRECT_URI + "x",
        "code_verifier": verifier,
    }
    assert await error_of(await token(idp, data)) == "invalid_grant"


async def test_expired_code_is_invalid_grant(idp: Idp) -> None:
    verifier, challenge = pkce()
    query = await login(idp, (verifier, challenge))
    idp.clock.advance(60)
    assert await error_of(await exchange(idp, query["code"], verifier)) == "invalid_grant"


async def test_wrong_totp_rerenders_form_then_succeeds(idp: Idp) -> None:
    verifier, challenge = pkce()
    page = await authorize(idp, auth_params(challenge, acr_values="mfa"))
    rid = request_id(await page.text())
    bad = await submit(idp, rid, username="alice", password="alice-password", otp=idp.wrong_totp())
    assert bad.status == 401
    html = await bad.text()
    assert "Invalid username, password or code." in html
    assert request_id(html) == rid
    assert "Set-Cookie" not in bad.headers

    ok = await submit(idp, rid, username="alice", password="alice-password", otp=idp.totp())
    query = callback(ok)
    body = await (await exchange(idp, query["code"], verifier)).json()
    _, idt = await verify(idp, body["id_token"], CLIENT_ID)
    assert idt["acr"] == "mfa"


async def test_mfa_request_without_otp_is_refused(idp: Idp) -> None:
    _, challenge = pkce()
    page = await authorize(idp, auth_params(challenge, acr_values="mfa"))
    resp = await submit(
        idp, request_id(await page.text()), username="alice", password="alice-password"
    )
    assert resp.status == 401


async def test_five_failed_attempts_drop_the_request(idp: Idp) -> None:
    _, challenge = pkce()
    page = await authorize(idp, auth_params(challenge, acr_values="mfa"))
    rid = request_id(await page.text())
    for attempt in range(1, 6):
        resp = await submit(idp, rid, username="alice", password="wrong")
        assert resp.status == 401
        assert ('name="request_id"' in await resp.text()) is (attempt < 5)
    late = await submit(idp, rid, username="alice", password="alice-password", otp=idp.totp())
    assert late.status == 400
    assert "Location" not in late.headers


async def test_bad_client_or_redirect_uri_is_400_without_redirect(idp: Idp) -> None:
    _, challenge = pkce()
    for params in (
        auth_params(challenge, redirect_uri="http://evil.example/cb"),
        auth_params(challenge, redirect_uri=REDIRECT_URI + "/"),
        auth_params(challenge, redirect_uri=""),
        auth_params(challenge, client_id="nobody"),
    ):
        resp = await authorize(idp, params)
        assert resp.status == 400
        assert "Location" not in resp.headers
        assert resp.content_type == "text/html"


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"code_challenge": ""}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"scope": "profile"}, "invalid_request"),
        ({"max_age": "soon"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"prompt": "none"}, "login_required"),
    ],
)
async def test_invalid_requests_redirect_with_error(
    idp: Idp, override: dict[str, str], error: str
) -> None:
    _, challenge = pkce()
    query = callback(await authorize(idp, auth_params(challenge, **override)))
    assert query["error"] == error
    assert query["state"] == "st-1"
    assert query["iss"] == idp.url
    assert "code" not in query


# -- SSO session -------------------------------------------------------------------------


async def test_sso_session_reuse_prompt_login_and_max_age(idp: Idp) -> None:
    first = pkce()
    q1 = await login(idp, first)
    _, t1 = await verify(
        idp, (await (await exchange(idp, q1["code"], first[0])).json())["id_token"], CLIENT_ID
    )

    # Same browser, no prompt: a code at once, same session, same auth_time.
    second = pkce()
    q2 = callback(await authorize(idp, auth_params(second[1], acr_values="mfa", nonce="n-2")))
    body = await (await exchange(idp, q2["code"], second[0])).json()
    _, t2 = await verify(idp, body["id_token"], CLIENT_ID)
    assert (t2["sid"], t2["auth_time"], t2["acr"], t2["nonce"]) == (
        t1["sid"],
        t1["auth_time"],
        "mfa",
        "n-2",
    )

    # prompt=login forces the form even with a fresh session.
    forced = await authorize(idp, auth_params(pkce()[1], prompt="login"))
    assert forced.status == 200
    assert 'name="request_id"' in await forced.text()

    # max_age: fresh enough -> code; exceeded (clock moved) -> form.
    idp.clock.advance(301)
    assert (await authorize(idp, auth_params(pkce()[1], max_age="400"))).status == 302
    third = pkce()
    stale = await authorize(idp, auth_params(third[1], max_age="300", acr_values="mfa"))
    assert stale.status == 200

    # Signing in again as the same user keeps the sid and moves auth_time.
    fields = {"username": "alice", "password": "alice-password", "otp": idp.totp()}
    q3 = callback(await submit(idp, request_id(await stale.text()), **fields))
    assert q3["state"] == "st-1"
    body3 = await (await exchange(idp, q3["code"], third[0])).json()
    _, t3 = await verify(idp, body3["id_token"], CLIENT_ID)
    assert t3["sid"] == t1["sid"]
    assert t3["auth_time"] == int(idp.clock.now) == t1["auth_time"] + 301


async def test_session_with_pwd_only_does_not_satisfy_mfa(idp: Idp) -> None:
    verifier, challenge = pkce()
    query = await login(idp, (verifier, challenge), otp=False)
    _, idt = await verify(
        idp, (await (await exchange(idp, query["code"], verifier)).json())["id_token"], CLIENT_ID
    )
    assert (idt["acr"], idt["amr"]) == ("pwd", ["pwd"])

    step_up = await authorize(idp, auth_params(pkce()[1], acr_values="mfa phr"))
    assert step_up.status == 200
    html = await step_up.text()
    assert 'name="otp"' in html
    # the session's user: only the second factor is asked, and the page says why
    assert "Signed in as <strong>alice</strong>" in html and 'name="password"' not in html
    assert "asks for a second factor" in html


async def test_a_step_up_asks_only_for_the_second_factor_of_the_signed_in_user(
    idp: Idp,
) -> None:
    first = pkce()
    q1 = await login(idp, first, otp=False)
    _, t1 = await verify(
        idp, (await (await exchange(idp, q1["code"], first[0])).json())["id_token"], CLIENT_ID
    )
    idp.clock.advance(60)
    # what the service sends for a step-up: acr_values, max_age, prompt=login, login_hint
    second = pkce()
    params = auth_params(
        second[1], acr_values="mfa phr", max_age="900", prompt="login", login_hint="alice"
    )
    page = await authorize(idp, params)
    html = await page.text()
    assert page.status == 200 and 'name="password"' not in html
    assert "You are signed in as alice: enter the code from your app." in html
    rid = request_id(html)
    wrong = await submit(idp, rid, otp=idp.wrong_totp())
    assert wrong.status == 401 and "Invalid code." in await wrong.text()
    q2 = callback(await submit(idp, rid, otp=idp.totp()))
    body = await (await exchange(idp, q2["code"], second[0])).json()
    _, t2 = await verify(idp, body["id_token"], CLIENT_ID)
    # the same session, both factors, the newest just now
    assert (t2["sub"], t2["sid"], t2["acr"], t2["amr"]) == (
        "alice",
        t1["sid"],
        "mfa",
        ["pwd", "otp"],
    )
    assert t2["auth_time"] == int(idp.clock.now) == t1["auth_time"] + 60


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        ("none", "You are not signed in here"),
        ("bob", "You are signed in here as bob, but the application asks for alice"),
        ("stale", "older than the 15 minutes it allows"),
    ],
)
async def test_a_step_up_that_asks_for_the_password_again_says_why(
    idp: Idp, setup: str, says: str
) -> None:
    if setup == "bob":
        page = await authorize(idp, auth_params(pkce()[1]))
        await submit(idp, request_id(await page.text()), username="bob", password="bob-password")
    elif setup == "stale":
        await login(idp, pkce(), otp=False)
        idp.clock.advance(901)
    params = auth_params(
        pkce()[1], acr_values="mfa", max_age="900", prompt="login", login_hint="alice"
    )
    html = await (await authorize(idp, params)).text()
    assert 'name="password"' in html and 'name="otp"' in html
    assert says in html, html


async def test_a_second_factor_page_does_not_outlive_a_change_of_user(idp: Idp) -> None:
    await login(idp, pkce(), otp=False)
    params = auth_params(pkce()[1], acr_values="mfa", prompt="login", login_hint="alice")
    rid = request_id(await (await authorize(idp, params)).text())
    # meanwhile, in another tab, bob signs in in this browser
    other = await authorize(idp, auth_params(pkce()[1], prompt="login"))
    await submit(idp, request_id(await other.text()), username="bob", password="bob-password")
    resp = await submit(idp, rid, otp=idp.totp())
    assert resp.status == 401  # no code for alice on bob's session


async def test_new_user_in_same_browser_gets_new_sid(idp: Idp) -> None:
    v1, c1 = pkce()
    q1 = await login(idp, (v1, c1), otp=False)
    _, t1 = await verify(
        idp, (await (await exchange(idp, q1["code"], v1)).json())["id_token"], CLIENT_ID
    )
    v2, c2 = pkce()
    page = await authorize(idp, auth_params(c2, prompt="login"))
    q2 = callback(
        await submit(idp, request_id(await page.text()), username="bob", password="bob-password")
    )
    _, t2 = await verify(
        idp, (await (await exchange(idp, q2["code"], v2)).json())["id_token"], CLIENT_ID
    )
    assert t2["sub"] == "bob"
    assert t2["sid"] != t1["sid"]


# -- password grant and client authentication ------------------------------------------


async def test_password_grant_with_and_without_otp(idp: Idp) -> None:
    base = {"grant_type": "password", "username": "bob", "password": "bob-password"}

    plain = await token(idp, base)
    assert plain.status == 200
    _, at = await verify(idp, (await plain.json())["access_token"], "stepup-demo")
    assert (at["sub"], at["acr"], at["amr"], at["scope"]) == ("bob", "pwd", ["pwd"], "openid")

    mfa = await token(idp, {**base, "otp": idp.totp(BOB_TOTP_SECRET), "acr_values": "mfa"})
    body = await mfa.json()
    _, at2 = await verify(idp, body["access_token"], "stepup-demo")
    _, idt = await verify(idp, body["id_token"], CLIENT_ID)
    assert (at2["acr"], at2["amr"], idt["acr"]) == ("mfa", ["pwd", "otp"], "mfa")
    assert "nonce" not in idt
    assert at2["sid"] != at["sid"]  # a new session per call...

    kept = await token(idp, {**base, "sid": at["sid"]})
    _, at3 = await verify(idp, (await kept.json())["access_token"], "stepup-demo")
    assert at3["sid"] == at["sid"]  # ...unless one is passed

    for data in (
        {**base, "acr_values": "mfa"},
        {**base, "otp": idp.wrong_totp(BOB_TOTP_SECRET)},
        {**base, "password": "alice-password"},
        {**base, "username": "mallory"},
    ):
        refused = await token(idp, data)
        assert refused.status == 400
        assert await error_of(refused) == "invalid_grant"


async def test_client_authentication(idp: Idp) -> None:
    grant = {"grant_type": "password", "username": "alice", "password": "alice-password"}
    post = {**grant, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    assert (await token(idp, post, use_basic=False)).status == 200

    for data in ({**post, "client_secret": "nope"}, grant, {**grant, "client_id": CLIENT_ID}):
        resp = await token(idp, data, use_basic=False)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="devidp"'
        assert await error_of(resp) == "invalid_client"

    wrong_basic = await idp.http.post(
        f"{idp.url}/token", data=grant, headers=basic(CLIENT_ID, "nope")
    )
    assert wrong_basic.status == 401
    assert await error_of(wrong_basic) == "invalid_client"

    both = await token(idp, {**grant, "client_secret": CLIENT_SECRET})
    assert await error_of(both) == "invalid_request"
    unsupported = await token(idp, {"grant_type": "client_credentials"})
    assert await error_of(unsupported) == "unsupported_grant_type"


# -- hygiene and command line -------------------------------------------------------------


async def test_no_secrets_in_logs(idp: Idp, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    verifier, challenge = pkce()
    otp = idp.totp()
    page = await authorize(idp, auth_params(challenge, acr_values="mfa"))
    query = callback(
        await submit(
            idp, request_id(await page.text()), username="alice", password="alice-password", otp=otp
        )
    )
    body = await (await exchange(idp, query["code"], verifier)).json()
    text = caplog.text
    assert "sign-in ok user=alice acr=mfa" in text
    for secret in (
        "alice-password",
        query["code"],
        body["access_token"],
        body["id_token"],
        verifier,
    ):
        assert secret not in text
    assert f"otp={otp}" not in text


async def test_cli_serve_and_totp() -> None:
    totp = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authz.devidp", "totp", "--user", "bob",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    before = pyotp.TOTP(BOB_TOTP_SECRET).now()
    out, _ = await totp.communicate()
    after = pyotp.TOTP(BOB_TOTP_SECRET).now()
    assert totp.returncode == 0
    assert out.decode().strip() in {before, after}

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authz.devidp", "serve", "--port", "0",
        "--client-id", "demo", "--client-secret", "s", "--redirect-uri", REDIRECT_URI,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().strip()
        match = re.fullmatch(r"devidp listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, line
        url = match.group(1)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{url}/.well-known/openid-configuration") as resp,
        ):
            assert (await resp.json())["issuer"] == url
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


def test_config_file_adds_users_and_clients(tmp_path: Path) -> None:
    good = tmp_path / "users.yaml"
    good.write_text(
        "users:\n"
        "  carol:\n"
        "    {password: carol-password, totp_secret: GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ, name: C}\n"
        "clients:\n"
        "  other: {secret: s, redirect_uris: ['http://127.0.0.1:8081/cb']}\n"
    )
    users, clients = load_file(good)
    assert users["carol"].password == "carol-password"
    assert clients["other"].redirect_uris == ("http://127.0.0.1:8081/cb",)

    bad = tmp_path / "bad.yaml"
    bad.write_text("users:\n  dave: {password: x, totp_secret: 'not base32!'}\n")
    with pytest.raises(ConfigError, match="dave: totp_secret is not base32 of at least 112 bits"):
        load_file(bad)
    with pytest.raises(ConfigError, match="issuer"):
        DevIdpConfig(issuer="127.0.0.1:9400")
