"""Logout (authz.stepup.logout): the back-channel logout token verified by the real
verifier with real signatures, each refusal with its reason, the jti remembered; the
RP-initiated logout's same-origin POST, its allowlisted return address, the grants it ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp.test_utils import TestClient, TestServer

from authz.audit.events import AuditEvent, EventType
from authz.audit.testing import MemoryAuditor
from authz.check.tokens import StaticKeySource, TokenVerifier
from authz.config.settings import LogoutSettings, OidcSettings, Settings
from authz.core.session import Evidence, Grant, session_key, user_key
from authz.stepup.logout import BACKCHANNEL_EVENT, LogoutApp
from authz.stepup.oidc import ProviderMetadata
from authz.store.memory import MemorySessionStore
from tests.builders import (
    AUDIENCE,
    CLIENT_ID,
    DROP,
    ISSUER,
    NOW,
    FakeClock,
    FakeTokens,
    identity,
    jwks,
    rsa_key,
    settings,
    sign,
)

KEY = rsa_key("k1")
OTHER = rsa_key("k1")  # the same kid, another key: a forged signature
END_SESSION = "https://idp.example.com/logout"
PUBLIC = "https://trading.example.com"
AFTER = "https://trading.example.com/signed-out"
TOKEN = "alice-access-token"


def logout_claims(**over: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": CLIENT_ID,
        "iat": NOW,
        "exp": NOW + 120,
        "jti": "jti-0001",
        "sub": "alice",
        "sid": "s1",
        "events": {BACKCHANNEL_EVENT: {}},
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not DROP}


class Env:
    def __init__(self, tmp_path: Path, **logout: Any) -> None:
        base = settings(tmp_path)
        self.settings: Settings = base.model_copy(update={"logout": LogoutSettings(**logout)})
        self.clock = FakeClock(NOW)
        self.store = MemorySessionStore(self.clock)
        self.auditor = MemoryAuditor()
        self.access = FakeTokens()
        self.access.access[TOKEN] = identity()
        oidc = OidcSettings(issuer=ISSUER, client_id=CLIENT_ID, audience=AUDIENCE)
        self.app = LogoutApp(
            settings=self.settings,
            logout_tokens=TokenVerifier(oidc, StaticKeySource(jwks(KEY))),
            access_tokens=self.access,
            store=self.store,
            metadata=ProviderMetadata(
                ISSUER, f"{ISSUER}/auth", f"{ISSUER}/token", end_session_endpoint=END_SESSION
            ),
            auditor=self.auditor,
            clock=self.clock,
        )

    async def grant(self, subject: str = "alice", sid: str = "s1") -> None:
        g = Grant("elevated", Evidence("mfa", ("pwd", "otp"), NOW), NOW + 900, NOW)
        await self.store.write_grant(
            user_key(ISSUER, subject), session_key(ISSUER, subject, sid), g, NOW
        )

    async def state(self, subject: str = "alice", sid: str = "s1") -> Any:
        return await self.store.read_check(
            user=user_key(ISSUER, subject),
            session=session_key(ISSUER, subject, sid),
            levels=("elevated",),
            level="elevated",
            device=None,
            ip=None,
            sensitive=False,
            window_s=60,
            now=int(self.clock()),
        )

    def logouts(self) -> list[AuditEvent]:
        return [e for e in self.auditor.events if e.type is EventType.LOGOUT]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.fixture
async def client(env: Env) -> AsyncIterator[TestClient[object, object]]:
    async with TestClient(TestServer(env.app.build())) as c:
        yield c  # type: ignore[misc]


async def post_token(client: TestClient[object, object], token: str) -> Any:
    return await client.post("/_stepup/backchannel-logout", data={"logout_token": token})


# -- back-channel ---------------------------------------------------------------------------


async def test_a_logout_token_with_sid_ends_that_session_and_its_grants(
    env: Env, client: TestClient[object, object]
) -> None:
    await env.grant(sid="s1")
    await env.grant(sid="s2")
    resp = await post_token(client, sign(KEY, logout_claims(), typ="logout+jwt"))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Cache-Control"] == "no-store"
    ended = await env.state(sid="s1")
    assert ended.session_revoked and ended.grants == ()
    other = await env.state(sid="s2")  # another browser of the same user keeps its grant
    assert not other.session_revoked and len(other.grants) == 1
    (event,) = env.logouts()
    assert (event.outcome, event.user, event.session) == (
        "success",
        f"{ISSUER}|alice",
        session_key(ISSUER, "alice", "s1"),
    )
    assert event.details["via"] == "back-channel" and event.details["grants_ended"] == 1


async def test_a_logout_token_with_sub_only_ends_every_session_of_the_user(
    env: Env, client: TestClient[object, object]
) -> None:
    await env.grant(sid="s1")
    await env.grant(sid="s2")
    await env.grant(subject="bob", sid="s1")
    resp = await post_token(client, sign(KEY, logout_claims(sid=DROP)))
    assert resp.status == 200
    for sid in ("s1", "s2"):
        assert (await env.state(sid=sid)).grants == ()
    assert (await env.state(sid="s1")).revoked_before == NOW  # tokens issued before: refused
    assert len((await env.state(subject="bob")).grants) == 1
    assert env.logouts()[0].session is None


async def test_an_unknown_sid_ends_the_users_sessions_unless_configured_otherwise(
    tmp_path: Path,
) -> None:
    """Access tokens without `sid` key sessions by the token: the IdP's sid matches none of
    ours, and the service cannot tell which one it was -- it ends them all."""
    for mode, survives in (("user", False), ("session", True)):
        env = Env(tmp_path, unknown_sid=mode)
        await env.grant(sid="token:abc")
        async with TestClient(TestServer(env.app.build())) as c:
            resp = await post_token(c, sign(KEY, logout_claims(sid="idp-sid")))
        assert resp.status == 200
        assert bool((await env.state(sid="token:abc")).grants) is survives


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        pytest.param(sign(OTHER, logout_claims()), "logout-token-invalid", id="bad-signature"),
        pytest.param(
            sign(KEY, logout_claims(aud="another-client")), "logout-token-invalid", id="wrong-aud"
        ),
        pytest.param(
            sign(KEY, logout_claims(iss="https://evil.example")),
            "logout-token-invalid",
            id="wrong-iss",
        ),
        pytest.param(sign(KEY, logout_claims(exp=NOW - 60)), "logout-token-invalid", id="expired"),
        pytest.param(sign(KEY, logout_claims(exp=DROP)), "logout-token-invalid", id="no-exp"),
        pytest.param(
            sign(KEY, logout_claims(iat=NOW - 3600, exp=NOW + 60)),
            "logout-token-invalid",
            id="iat-too-old",
        ),
        pytest.param(
            sign(KEY, logout_claims(iat=NOW + 600)), "logout-token-invalid", id="iat-future"
        ),
        pytest.param(sign(KEY, logout_claims(jti=DROP)), "logout-token-invalid", id="no-jti"),
        pytest.param(
            sign(KEY, logout_claims(), typ="at+jwt"), "logout-token-invalid", id="access-token-typ"
        ),
        pytest.param(
            sign(KEY, logout_claims(events=DROP)), "logout-event-missing", id="missing-events"
        ),
        pytest.param(
            sign(KEY, logout_claims(events={"http://schemas.openid.net/event/other": {}})),
            "logout-event-missing",
            id="other-event",
        ),
        pytest.param(
            sign(KEY, logout_claims(events={BACKCHANNEL_EVENT: "yes"})),
            "logout-event-missing",
            id="event-not-an-object",
        ),
        pytest.param(
            sign(KEY, logout_claims(nonce="n-1")), "logout-nonce-present", id="nonce-present"
        ),
        pytest.param(
            sign(KEY, logout_claims(sub=DROP, sid=DROP)),
            "logout-subject-missing",
            id="neither-sid-nor-sub",
        ),
        pytest.param(
            sign(KEY, logout_claims(sub=DROP)), "logout-subject-missing", id="sid-without-sub"
        ),
        pytest.param("not-a-jwt", "logout-token-invalid", id="not-a-jwt"),
        pytest.param(
            sign(KEY, logout_claims(jti="a\nb")), "logout-token-invalid", id="jti-control-char"
        ),
        pytest.param(
            sign(KEY, logout_claims(sid=["s1"])), "logout-token-invalid", id="sid-not-a-string"
        ),
    ],
)
async def test_every_refused_logout_token_is_400_and_ends_nothing(
    env: Env, client: TestClient[object, object], token: str, reason: str
) -> None:
    await env.grant()
    resp = await post_token(client, token)
    assert resp.status == 400
    assert resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    assert body["error"] == "invalid_request" and body["error_description"]
    state = await env.state()
    assert not state.session_revoked and state.revoked_before is None and len(state.grants) == 1
    (event,) = env.logouts()
    assert (event.outcome, event.reason) == ("failure", reason)


async def test_a_replayed_logout_token_is_refused_and_its_jti_kept_while_it_is_valid(
    env: Env, client: TestClient[object, object]
) -> None:
    token = sign(KEY, logout_claims())
    assert (await post_token(client, token)).status == 200
    # The user signs in again (same IdP session id) and steps up; the old token, replayed,
    # must not end the new grant.
    env.clock.advance(60)
    resp = await post_token(client, token)
    assert resp.status == 400
    assert env.logouts()[-1].reason == "logout-replayed"
    # Remembered until the token can no longer be accepted (exp + leeway), not forever.
    once = [k for k in env.store._once if k.startswith("logout-jti:")]
    assert len(once) == 1
    assert env.store._once[once[0]] == NOW + 120 + env.settings.oidc.leeway_s


async def test_a_user_id_with_spaces_and_non_ascii_is_still_logged_out(
    env: Env, client: TestClient[object, object]
) -> None:
    """The access token accepts any user id without control characters; so must logout,
    or that user's sessions could never be ended from the IdP."""
    await env.grant(subject="José Ñ", sid="s 1")
    resp = await post_token(client, sign(KEY, logout_claims(sub="José Ñ", sid="s 1")))
    assert resp.status == 200
    assert (await env.state(subject="José Ñ", sid="s 1")).grants == ()


async def test_a_different_jti_is_a_new_logout(
    env: Env, client: TestClient[object, object]
) -> None:
    assert (await post_token(client, sign(KEY, logout_claims(jti="a")))).status == 200
    assert (await post_token(client, sign(KEY, logout_claims(jti="b")))).status == 200


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"", "application/x-www-form-urlencoded"),
        (b"logout_token=a&logout_token=b", "application/x-www-form-urlencoded"),
        (b'{"logout_token": "x"}', "application/json"),
        (b"logout_token=" + b"a" * 10_000, "application/x-www-form-urlencoded"),
    ],
)
async def test_a_malformed_request_is_400(
    env: Env, client: TestClient[object, object], body: bytes, content_type: str
) -> None:
    resp = await client.post(
        "/_stepup/backchannel-logout", data=body, headers={"Content-Type": content_type}
    )
    assert resp.status == 400
    assert env.logouts()[0].reason == "bad-request"


async def test_a_store_outage_is_400_temporarily_unavailable(
    env: Env, client: TestClient[object, object]
) -> None:
    env.store.fail = True
    resp = await post_token(client, sign(KEY, logout_claims()))
    assert resp.status == 400
    assert (await resp.json())["error"] == "temporarily_unavailable"
    assert env.logouts()[0].reason == "store-error"


async def test_backchannel_off_is_no_route(tmp_path: Path) -> None:
    env = Env(tmp_path, backchannel=False)
    async with TestClient(TestServer(env.app.build())) as c:
        resp = await post_token(c, sign(KEY, logout_claims()))
    assert resp.status in (404, 405)


# -- RP-initiated ---------------------------------------------------------------------------

COOKIES = {"Cookie": f"__Host-stepup-token={TOKEN}; __Host-stepup-state=st"}


async def test_get_logout_only_shows_a_confirmation(
    env: Env, client: TestClient[object, object]
) -> None:
    await env.grant()
    resp = await client.get("/_stepup/logout", headers=COOKIES, allow_redirects=False)
    assert resp.status == 200
    assert 'method="post" action="/_stepup/logout"' in await resp.text()
    csp = resp.headers["Content-Security-Policy"]
    assert "form-action 'self' https://idp.example.com;" in csp  # the IdP the form goes on to
    assert "frame-ancestors 'none'" in csp  # no clickjacking into the button
    assert len((await env.state()).grants) == 1 and env.logouts() == []


async def test_post_logout_ends_the_session_clears_cookies_and_goes_to_the_idp(
    env: Env, client: TestClient[object, object]
) -> None:
    await env.grant()
    resp = await client.post(
        "/_stepup/logout", headers={**COOKIES, "Origin": PUBLIC}, allow_redirects=False
    )
    assert resp.status == 303
    location = urlsplit(resp.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == END_SESSION
    assert parse_qs(location.query) == {"client_id": [CLIENT_ID]}  # no allowlist: no return
    cleared = {k: m.value for k, m in resp.cookies.items()}
    assert cleared == {"__Host-stepup-token": "", "__Host-stepup-state": ""}
    state = await env.state()
    assert state.session_revoked and state.grants == ()
    (event,) = env.logouts()
    assert (event.outcome, event.details["via"], event.session) == (
        "success",
        "rp-initiated",
        session_key(ISSUER, "alice", "s1"),
    )


@pytest.mark.parametrize("origin", [None, "https://evil.example", "null", PUBLIC + ".evil"])
async def test_a_cross_site_logout_post_ends_nothing(
    env: Env, client: TestClient[object, object], origin: str | None
) -> None:
    await env.grant()
    headers = dict(COOKIES)
    if origin is not None:
        headers["Origin"] = origin
    resp = await client.post("/_stepup/logout", headers=headers, allow_redirects=False)
    assert resp.status == 403
    assert "Set-Cookie" not in resp.headers
    assert len((await env.state()).grants) == 1
    assert env.logouts()[0].reason == "origin-missing"


async def test_post_logout_redirect_uri_only_from_the_allowlist(tmp_path: Path) -> None:
    env = Env(tmp_path, post_logout_redirect_uris=(AFTER, PUBLIC + "/bye"))
    await env.grant()
    async with TestClient(TestServer(env.app.build())) as c:
        headers = {**COOKIES, "Origin": PUBLIC}
        default = await c.post("/_stepup/logout", headers=headers, allow_redirects=False)
        chosen = await c.post(
            "/_stepup/logout",
            data={"post_logout_redirect_uri": PUBLIC + "/bye"},
            headers=headers,
            allow_redirects=False,
        )
        foreign = await c.post(
            "/_stepup/logout",
            data={"post_logout_redirect_uri": "https://evil.example/phish"},
            headers=headers,
            allow_redirects=False,
        )
    q = parse_qs(urlsplit(default.headers["Location"]).query)
    assert q["post_logout_redirect_uri"] == [AFTER]
    q = parse_qs(urlsplit(chosen.headers["Location"]).query)
    assert q["post_logout_redirect_uri"] == [PUBLIC + "/bye"]
    assert foreign.status == 400 and "Location" not in foreign.headers


async def test_post_logout_without_a_session_still_clears_cookies(
    env: Env, client: TestClient[object, object]
) -> None:
    resp = await client.post(
        "/_stepup/logout",
        headers={"Cookie": "__Host-stepup-token=unknown", "Origin": PUBLIC},
        allow_redirects=False,
    )
    assert resp.status == 303
    assert resp.cookies["__Host-stepup-token"].value == ""
    assert env.logouts()[0].session is None


async def test_post_logout_with_the_store_down_says_so(
    env: Env, client: TestClient[object, object]
) -> None:
    env.store.fail = True
    resp = await client.post(
        "/_stepup/logout", headers={**COOKIES, "Origin": PUBLIC}, allow_redirects=False
    )
    assert resp.status == 503
    assert env.logouts()[0].reason == "store-error"


async def test_no_end_session_endpoint_ends_locally_and_returns(tmp_path: Path) -> None:
    env = Env(tmp_path, post_logout_redirect_uris=(AFTER,))
    env.app.metadata = ProviderMetadata(ISSUER, f"{ISSUER}/auth", f"{ISSUER}/token")
    async with TestClient(TestServer(env.app.build())) as c:
        resp = await c.post(
            "/_stepup/logout", headers={**COOKIES, "Origin": PUBLIC}, allow_redirects=False
        )
    assert resp.headers["Location"] == AFTER
