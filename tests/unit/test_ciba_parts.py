"""The pieces of the push step-up on their own: the binding message, the stored record, the
settings' bounds, what the service refuses to start with, and the IdP client on the wire
(an aiohttp server standing in for the IdP's two endpoints)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import ValidationError

from authz.config.settings import CibaSettings, OidcSettings, Settings
from authz.errors import ConfigError, OidcError
from authz.stepup.ciba.backchannel import (
    GRANT_TYPE,
    BackchannelClient,
    BackchannelRefused,
    Polled,
    acknowledgement,
    poll_result,
)
from authz.stepup.ciba.request import CibaRequest, Status, binding_message
from authz.stepup.ciba.service import backchannel_endpoint
from authz.stepup.oidc import ProviderMetadata
from authz.stepup.profiles import PROFILES

# -- the binding message ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "chars", "expected"),
    [
        ("GET", "/accounts/1", 20, "K7QF-GET/accounts/1"),
        ("POST", "/wires/12345", 20, "K7QF-POST/wires/..."),  # never "/wires/12"
        ("POST", "/wires/12345", 23, "K7QF-POST/wires/12345"),
        ("GET", "/a b/c~d", 20, "K7QF-GET/a_b/c_d"),  # only what every device shows
        ("DELETE", "/verylongsegment", 14, "K7QF-DELETE/.."),
        ("GET", "/", 20, "K7QF-GET/"),
    ],
)
def test_the_binding_message_names_the_action_within_bounds(
    method: str, path: str, chars: int, expected: str
) -> None:
    message = binding_message("K7QF", method, path, chars)
    assert message == expected
    assert len(message) <= chars


def test_the_binding_message_fits_oidc_providers_default_rule() -> None:
    import re

    rule = re.compile(r"^[a-zA-Z0-9-._+/!?#]{1,20}$")  # oidc-provider validateBindingMessage
    for path in ("/accounts/1", "/clients/99/statements", "/wires/ünïcödé", "/x?y=1"):
        assert rule.match(binding_message("BCDF", "POST", path, 20))


# -- the record ------------------------------------------------------------------------------

RECORD = CibaRequest(
    auth_req_id="auth-req-0123456789abcdef",
    level="elevated",
    issuer="https://idp",
    subject="alice",
    user_key="uk",
    session_key="sk",
    route="GET h /a",
    binding_message="K7QF-GET/a",
    issued_at=1,
    expires_at=121,
    interval=5,
    next_poll_at=6,
    ip="10.0.0.7",
)


def test_the_record_reads_back_what_it_wrote() -> None:
    assert CibaRequest.from_json(RECORD.to_json()) == RECORD
    done = CibaRequest.from_json(
        {**RECORD.to_json(), "status": "approved", "reason": "success", "grant_exp": 9}
    )
    assert done is not None and done.status is Status.APPROVED and done.ended


@pytest.mark.parametrize(
    "change",
    [
        {"status": "granted"},
        {"sk": ""},
        {"iat": "1"},
        {"exp": 1.5},
        {"interval": True},
        {"ip": 7},
        {"grant_exp": "9"},
    ],
)
def test_a_record_of_another_shape_is_refused(change: dict[str, Any]) -> None:
    assert CibaRequest.from_json({**RECORD.to_json(), **change}) is None


# -- settings and start-up -------------------------------------------------------------------


def test_the_settings_bounds_are_checked() -> None:
    with pytest.raises(ValidationError, match="min_interval_s"):
        CibaSettings(min_interval_s=10, max_interval_s=5)
    with pytest.raises(ValidationError, match="max_per_session"):
        CibaSettings(max_per_session=5, max_per_user=2)
    with pytest.raises(ValidationError):
        CibaSettings(max_expiry_s=3600)


def _settings(tmp_path: Any, **ciba: Any) -> Settings:
    return Settings(
        policy_file=tmp_path / "p.yaml",
        oidc=OidcSettings(issuer="https://idp", client_id="c", audience="a"),
        ciba=CibaSettings(enabled=True, **ciba),
    )


def meta(**over: Any) -> ProviderMetadata:
    base: dict[str, Any] = {
        "issuer": "https://idp",
        "authorization_endpoint": "https://idp/auth",
        "token_endpoint": "https://idp/token",
        "backchannel_authentication_endpoint": "https://idp/backchannel",
        "backchannel_token_delivery_modes": ("poll", "ping"),
    }
    return ProviderMetadata(**{**base, **over})


def test_what_the_service_will_not_start_with(tmp_path: Any) -> None:
    s = _settings(tmp_path)
    assert backchannel_endpoint(s, meta(), PROFILES["generic"]) == "https://idp/backchannel"
    override = _settings(tmp_path, endpoint="https://idp/bc2")
    assert backchannel_endpoint(override, meta(), PROFILES["generic"]) == "https://idp/bc2"
    with pytest.raises(ConfigError, match="offers no OpenID CIBA"):
        backchannel_endpoint(s, meta(), PROFILES["entra"])
    with pytest.raises(ConfigError, match="backchannel_authentication_endpoint"):
        backchannel_endpoint(s, meta(backchannel_authentication_endpoint=None), PROFILES["generic"])
    with pytest.raises(ConfigError, match="push"):
        backchannel_endpoint(
            s, meta(backchannel_token_delivery_modes=("push",)), PROFILES["generic"]
        )


# -- what the IdP answers, typed strictly ----------------------------------------------------


def test_an_acknowledgement_is_read_strictly() -> None:
    ack = acknowledgement({"auth_req_id": "a" * 20, "expires_in": 120, "interval": 2})
    assert (ack.expires_in, ack.interval) == (120, 2)
    for bad in (
        {"auth_req_id": "short", "expires_in": 120},
        {"auth_req_id": "a" * 20, "expires_in": "120"},
        {"auth_req_id": "a" * 20, "expires_in": 0},
        {"auth_req_id": "a" * 20, "expires_in": 120, "interval": 0},
        {"auth_req_id": "a b" * 10, "expires_in": 120},
        {"auth_req_id": "a" * 2000, "expires_in": 120},
    ):
        with pytest.raises(BackchannelRefused):
            acknowledgement(bad)


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, {"id_token": "x.y.z", "access_token": "a"}, Polled.TOKENS),
        (200, {"access_token": "a"}, Polled.REFUSED),
        (400, {"error": "authorization_pending"}, Polled.PENDING),
        (400, {"error": "slow_down"}, Polled.SLOW_DOWN),
        (400, {"error": "expired_token"}, Polled.EXPIRED),
        (400, {"error": "access_denied"}, Polled.DENIED),
        (400, {"error": "invalid_grant"}, Polled.REFUSED),
        (401, {"error": "invalid_client"}, Polled.REFUSED),
        (400, ["not", "an", "object"], Polled.REFUSED),
        (503, {"error": "temporarily_unavailable"}, Polled.UNAVAILABLE),
        (429, {}, Polled.UNAVAILABLE),
        (400, None, Polled.UNAVAILABLE),
    ],
)
def test_each_token_endpoint_answer(status: int, body: Any, outcome: Polled) -> None:
    assert poll_result(status, body).outcome is outcome


# -- the IdP client on the wire --------------------------------------------------------------


class FakeIdp:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], str | None]] = []
        self.backchannel: tuple[int, Any] = (200, {"auth_req_id": "r" * 20, "expires_in": 60})
        self.token: tuple[int, Any] = (400, {"error": "authorization_pending"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/bc", self.handle)
        app.router.add_post("/token", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.seen.append((request.path, form, request.headers.get("Authorization")))
        status, body = self.backchannel if request.path == "/bc" else self.token
        if body is None:
            return web.Response(status=status, text="<html>oops</html>")
        return web.json_response(body, status=status)


@pytest.fixture
async def idp() -> AsyncIterator[tuple[FakeIdp, BackchannelClient]]:
    fake = FakeIdp()
    async with TestServer(fake.app()) as server, aiohttp.ClientSession() as http:
        yield (
            fake,
            BackchannelClient(
                endpoint=str(server.make_url("/bc")),
                token_endpoint=str(server.make_url("/token")),
                client_id="stepup authz",
                client_secret="s:e/cret",
                session=http,
                timeout_s=2,
            ),
        )


async def test_the_client_authenticates_as_for_the_code_exchange(
    idp: tuple[FakeIdp, BackchannelClient],
) -> None:
    fake, client = idp
    ack = await client.authenticate({"login_hint": "alice", "scope": "openid"})
    assert ack.interval is None and ack.expires_in == 60
    polled = await client.poll(ack.auth_req_id)
    assert polled.outcome is Polled.PENDING
    (_, bc_form, bc_auth), (_, token_form, token_auth) = fake.seen
    expected = "Basic " + base64.b64encode(b"stepup%20authz:s%3Ae%2Fcret").decode()
    assert bc_auth == token_auth == expected  # RFC 6749 2.3.1: urlencoded, then Basic
    assert bc_form == {"login_hint": "alice", "scope": "openid"}
    assert token_form == {"grant_type": GRANT_TYPE, "auth_req_id": "r" * 20}


async def test_an_idp_refusal_names_its_error_and_an_outage_is_unavailable(
    idp: tuple[FakeIdp, BackchannelClient],
) -> None:
    fake, client = idp
    fake.backchannel = (400, {"error": "unknown_user_id"})
    with pytest.raises(BackchannelRefused) as refused:
        await client.authenticate({})
    assert refused.value.idp_error == "unknown_user_id"
    fake.backchannel = (502, None)
    with pytest.raises(OidcError) as down:
        await client.authenticate({})
    assert not isinstance(down.value, BackchannelRefused)
    fake.token = (500, None)
    assert (await client.poll("r" * 20)).outcome is Polled.UNAVAILABLE


async def test_an_unreachable_idp_is_unavailable() -> None:
    async with aiohttp.ClientSession() as http:
        client = BackchannelClient(
            endpoint="http://127.0.0.1:9/bc",
            token_endpoint="http://127.0.0.1:9/token",
            client_id="c",
            client_secret=None,
            session=http,
            timeout_s=1,
        )
        with pytest.raises(OidcError):
            await client.authenticate({})
        assert (await client.poll("r" * 20)).outcome is Polled.UNAVAILABLE


# -- the audit records -----------------------------------------------------------------------


def test_each_ciba_record_names_user_time_route_outcome_and_reason() -> None:
    from authz.audit import mapping as m
    from authz.audit.events import EventType, decode_record, encode_event

    user, t, route = "https://idp|alice", 1_733_011_200_000, "POST api.example /wires/1"
    cases = [
        (
            m.ciba_started(
                level="high",
                user=user,
                session="s",
                request_id="r1",
                acr_values=["phr"],
                binding=True,
                route=route,
                client_ip="10.0.0.7",
                ts_ms=t,
            ),
            EventType.CIBA_STARTED,
            "started",
            "sent-to-idp",
        ),
        (
            m.ciba_completed(
                level="high",
                user=user,
                session="s",
                request_id="r1",
                acr="phr",
                amr=["pwd", "hwk"],
                auth_time=5,
                issuer="https://idp",
                grant_expires_at=305,
                route=route,
                ts_ms=t,
            ),
            EventType.CIBA_COMPLETED,
            "success",
            "success",
        ),
        (
            m.ciba_failed(
                reason="ciba-denied",
                level="high",
                user=user,
                session="s",
                request_id="r1",
                idp_error="access_denied",
                route=route,
                ts_ms=t,
            ),
            EventType.CIBA_FAILED,
            "failure",
            "ciba-denied",
        ),
    ]
    for event, etype, outcome, reason in cases:
        rec = decode_record(encode_event(event))
        assert (rec["type"], rec["outcome"], rec["reason"], rec["ts_ms"]) == (
            etype,
            outcome,
            reason,
            t,
        )
        assert (rec["user"], rec["route"], rec["request_id"]) == (user, route, "r1")
    assert decode_record(encode_event(cases[1][0]))["factor"] == "hwk"
