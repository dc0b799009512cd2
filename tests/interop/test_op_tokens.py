"""The service's token verification against panva's oidc-provider (OpenID Certified).

Default configuration: opaque access tokens, no `sid` in them, no `amr` without a claims
request, RFC 7662 introspection. Profile emulations: RFC 9068 JWT access tokens for a
`resource`, Okta's `uid`, Entra's `acrs`. And the OP's own key rotation, twice inside the
JWKS refetch interval.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import pytest

from authz.check.introspection import build_access_tokens
from authz.check.jwks import JwksKeySource
from authz.check.tokens import TokenVerifier
from authz.config.settings import OidcSettings
from authz.core.reasons import Reason
from authz.core.session import unmet
from authz.errors import IntrospectionUnavailable, KeysUnavailable, TokenError
from authz.stepup import profiles
from tests.interop.harness import AUDIENCE, CLIENT_ID, CLIENT_SECRET, RESOURCE, Browser, Op, basic

pytestmark = pytest.mark.interop


class Level:
    """What core.session.unmet reads of a policy level (the demo policy's two step-ups)."""

    def __init__(self, acr: set[str], amr_any: set[str] = frozenset(), max_age: int | None = None):  # type: ignore[assignment]
        self.acr, self.amr_any, self.max_age = frozenset(acr), frozenset(amr_any), max_age


ELEVATED = Level({"mfa", "phr"}, max_age=900)
HIGH = Level({"phr"}, {"hwk", "fido"}, max_age=300)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def settings(op: Op, **over: Any) -> OidcSettings:
    base: dict[str, Any] = {
        "issuer": op.issuer,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "audience": AUDIENCE,
        "algorithms": ["RS256"],
    }
    base.update(over)
    return OidcSettings(**base)


async def keys(
    op: Op, http: aiohttp.ClientSession, clock: FakeClock | None = None
) -> JwksKeySource:
    src = JwksKeySource(
        http,
        issuer=op.issuer,
        min_interval_s=30,
        refresh_every_s=None,
        clock=clock or FakeClock(),
    )
    await src.start()
    return src


def now() -> int:
    # The OP stamps real time into its tokens; the verifier is handed the same clock.
    return int(time.time())


# -- default configuration: opaque tokens and introspection ----------------------------------


async def test_default_op_opaque_tokens_are_introspected(
    op_factory: Callable[..., Op], browser: Callable[[Op], Browser], http: aiohttp.ClientSession
) -> None:
    op = op_factory("default")
    b = browser(op)
    mfa = await b.sign_in(acr_values="mfa")
    assert mfa.access_token.count(".") == 0  # opaque, as the OP ships
    s = settings(
        op,
        introspection={
            "require_audience": False,
            "timeout_ms": 3000,
        },  # its opaque tokens carry no `aud`
        allowed_clients=[CLIENT_ID],
    )
    src = await keys(op, http)
    jwt_only = TokenVerifier(s, src)
    with pytest.raises(TokenError, match="compact"):  # what the service did before
        await jwt_only.verify_access_token(mfa.access_token, now())
    tokens = await build_access_tokens(s, jwt_only, http)
    assert tokens.introspector is not None
    assert tokens.introspector.endpoint == op.introspection_endpoint  # from discovery

    ident = await tokens.verify_access_token(mfa.access_token, now())
    assert ident.issuer == op.issuer and ident.subject == "u1-alice"
    assert ident.client_id == CLIENT_ID
    assert ident.evidence.acr == "mfa" and ident.evidence.auth_time is not None
    assert ident.evidence.amr == ()  # no amr unless requested
    assert unmet(ident.evidence, ELEVATED, now=now(), leeway=30) is None
    assert unmet(ident.evidence, HIGH, now=now(), leeway=30) is Reason.ACR_INSUFFICIENT

    pwd = await b.sign_in(factor="pwd")
    weak = await tokens.verify_access_token(pwd.access_token, now())
    assert unmet(weak.evidence, ELEVATED, now=now(), leeway=30) is Reason.ACR_INSUFFICIENT

    # The ID token of the same sign-in verifies, without amr (the claims parameter is off)
    id_claims = (await jwt_only.verify_id_token(mfa.id_token, now(), nonce=mfa.nonce)).claims
    assert id_claims["acr"] == "mfa" and "amr" not in id_claims
    profile = profiles.resolve(s)
    assert profiles.same_subject(profile, ident.subject, id_claims)
    await src.aclose()


async def test_introspection_refuses_what_is_not_an_active_access_token(
    op_factory: Callable[..., Op], browser: Callable[[Op], Browser], http: aiohttp.ClientSession
) -> None:
    op = op_factory("default")
    signed_in = await browser(op).sign_in(scope="openid offline_access", prompt="consent")
    s = settings(
        op,
        introspection={"require_audience": False, "timeout_ms": 3000},
        allowed_clients=[CLIENT_ID],
    )
    src = await keys(op, http)
    tokens = await build_access_tokens(s, TokenVerifier(s, src), http)
    t = now()
    assert await tokens.verify_access_token(signed_in.access_token, t)

    # A refresh token introspects as active at this OP; as a bearer token it is refused.
    refresh = signed_in.tokens.get("refresh_token")
    assert isinstance(refresh, str)
    with pytest.raises(TokenError, match="Bearer"):
        await tokens.verify_access_token(refresh, t)

    # Revoked at the IdP: once the cached answer's TTL (60 s) is over, it is refused.
    async with http.post(
        f"{op.issuer}/token/revocation", data={"token": signed_in.access_token}, headers=basic()
    ) as resp:
        assert resp.status == 200
    assert await tokens.verify_access_token(signed_in.access_token, t + 59)  # cached
    with pytest.raises(TokenError, match="not active"):
        await tokens.verify_access_token(signed_in.access_token, t + 61)

    # Wrong client credentials at the endpoint: fail closed, never "inactive" or allowed.
    bad = settings(
        op,
        client_secret="wrong",
        introspection={"require_audience": False, "timeout_ms": 3000},
        allowed_clients=[CLIENT_ID],
    )
    denied = await build_access_tokens(bad, TokenVerifier(bad, src), http)
    with pytest.raises(IntrospectionUnavailable, match="HTTP 401"):
        await denied.verify_access_token("another-opaque-token", t)
    await src.aclose()


# -- RFC 9068 JWT access tokens (resource indicators) ------------------------------------


async def test_rfc9470_api_flow_with_a_jwt_access_token(
    op_factory: Callable[..., Op], browser: Callable[[Op], Browser], http: aiohttp.ClientSession
) -> None:
    """An API client that got the RFC 9470 challenge (acr_values="mfa phr", max_age=900)
    obtains a token with that acr from the OP and presents it: the token's own acr and
    auth_time satisfy the level."""
    op = op_factory("jwt")
    b = browser(op)
    s = settings(op, token_typ="at+jwt", profile={"name": "generic", "resource": [RESOURCE]})
    params = profiles.authorize_params(profiles.resolve(s), acr=ELEVATED.acr, max_age=900)
    assert params["resource"] == (RESOURCE,)
    mfa = await b.sign_in(acr_values=str(params["acr_values"]), resource=RESOURCE, max_age=900)
    assert jwt.get_unverified_header(mfa.access_token)["typ"] == "at+jwt"
    src = await keys(op, http)
    v = TokenVerifier(s, src)
    ident = await v.verify_access_token(mfa.access_token, now())
    assert ident.evidence.acr == "mfa" and ident.evidence.amr == ("pwd", "otp")
    # no sid in the OP's access tokens: the token is its own session (no fallback by default)
    assert ident.session_id.startswith("token:")
    assert unmet(ident.evidence, ELEVATED, now=now(), leeway=30) is None
    # Without `resource` the same OP hands out an opaque token the JWT verifier refuses
    plain = await b.sign_in(acr_values="mfa")
    with pytest.raises(TokenError, match="compact"):
        await v.verify_access_token(plain.access_token, now())
    await src.aclose()


async def test_claims_request_brings_amr_for_the_high_level(
    op_factory: Callable[..., Op], browser: Callable[[Op], Browser], http: aiohttp.ClientSession
) -> None:
    op = op_factory("jwt")
    s = settings(op, profile={"name": "generic", "claims_request": True})
    params = profiles.authorize_params(
        profiles.resolve(s), acr=HIGH.acr, amr_any=HIGH.amr_any, max_age=HIGH.max_age
    )
    claims = json.loads(str(params["claims"]))
    key_sign_in = await browser(op).sign_in(factor="key", claims=claims, max_age=300)
    src = await keys(op, http)
    v = TokenVerifier(s, src)
    id_claims = (
        await v.verify_id_token(key_sign_in.id_token, now(), nonce=key_sign_in.nonce)
    ).claims
    evidence = profiles.read_evidence(profiles.resolve(s), id_claims)
    assert evidence.acr == "phr" and "hwk" in evidence.amr and evidence.auth_time is not None
    assert unmet(evidence, HIGH, now=now(), leeway=30) is None
    # Without the claims request this OP leaves amr out: the refusal names amr, not acr
    bare = await browser(op).sign_in(factor="key", acr_values="phr")
    bare_claims = (await v.verify_id_token(bare.id_token, now(), nonce=bare.nonce)).claims
    bare_ev = profiles.read_evidence(profiles.resolve(s), bare_claims)
    assert unmet(bare_ev, HIGH, now=now(), leeway=30) is Reason.AMR_INSUFFICIENT
    assert profiles.missing_evidence(
        bare_ev, acr=HIGH.acr, amr_any=HIGH.amr_any, max_age=HIGH.max_age
    ) == ("amr",)
    await src.aclose()


# -- profile emulations ------------------------------------------------------------------


async def test_okta_like_tokens(
    op_factory: Callable[..., Op], browser: Callable[[Op], Browser], http: aiohttp.ClientSession
) -> None:
    op = op_factory("okta")
    signed_in = await browser(op).sign_in(acr_values="mfa")
    assert "typ" not in jwt.get_unverified_header(signed_in.access_token)
    src = await keys(op, http)
    generic = settings(op)
    okta = settings(op, profile="okta", allowed_clients=[CLIENT_ID])
    # generic: the access token's user is the login, the ID token's the user id
    g = await TokenVerifier(generic, src).verify_access_token(signed_in.access_token, now())
    id_claims = (
        await TokenVerifier(generic, src).verify_id_token(
            signed_in.id_token, now(), nonce=signed_in.nonce
        )
    ).claims
    assert g.subject == "alice@example.com"
    assert not profiles.same_subject(profiles.resolve(generic), g.subject, id_claims)
    # okta: uid/sub match; cid is the client
    o = await TokenVerifier(okta, src).verify_access_token(signed_in.access_token, now())
    assert (o.subject, o.client_id, o.evidence.acr) == ("u1-alice", CLIENT_ID, "mfa")
    assert profiles.same_subject(profiles.resolve(okta), o.subject, id_claims)
    await src.aclose()


async def test_entra_like_tokens(
    op_factory: Callable[..., Op], browser: Callable[[Op], Browser], http: aiohttp.ClientSession
) -> None:
    op = op_factory("entra")
    s = settings(
        op,
        profile={
            "name": "entra",
            "auth_contexts": [{"id": "c1", "acr": "mfa"}, {"id": "c2", "acr": "phr"}],
        },
    )
    profile = profiles.resolve(s)
    params = profiles.authorize_params(profile, acr=ELEVATED.acr, max_age=900)
    assert "acr_values" not in params
    signed_in = await browser(op).sign_in(
        scope=str(params["scope"]), claims=json.loads(str(params["claims"]))
    )
    header = jwt.get_unverified_header(signed_in.access_token)
    assert header["typ"] == "JWT"
    src = await keys(op, http)
    v = TokenVerifier(s, src)
    ident = await v.verify_access_token(signed_in.access_token, now())
    assert ident.subject == "oid-u1-alice" and ident.client_id == CLIENT_ID
    assert ident.evidence.acr == "mfa"  # from acrs ["c1"]; the token has no acr claim
    assert unmet(ident.evidence, ELEVATED, now=now(), leeway=30) is None
    verified = await v.verify_id_token(signed_in.id_token, now(), nonce=signed_in.nonce)
    id_claims = verified.claims
    assert id_claims["acrs"] == ["c1"]
    assert profiles.same_subject(profile, ident.subject, id_claims)
    # what the grant rule compares: the ID token's user is its `oid`, not its `sub`
    assert verified.subject == ident.subject == id_claims["oid"] != id_claims["sub"]
    # the generic profile's typ default is not checked; Entra's refuses at+jwt
    jwt_op = op_factory("jwt")
    other = await browser(jwt_op).sign_in(resource=RESOURCE)
    jwt_src = await keys(jwt_op, http)
    with pytest.raises(TokenError, match="typ"):
        await TokenVerifier(settings(jwt_op, profile=s.profile), jwt_src).verify_access_token(
            other.access_token, now()
        )
    await src.aclose()
    await jwt_src.aclose()


# -- the OP's key rotation, twice inside the refetch interval ----------------------------


async def test_double_key_rotation_at_the_op(
    op_factory: Callable[..., Op], browser: Callable[[Op], Browser], http: aiohttp.ClientSession
) -> None:
    op = op_factory("jwt")
    b = browser(op)
    clock = FakeClock()
    src = await keys(op, http, clock)
    v = TokenVerifier(settings(op, token_cache_size=0), src)
    first = await b.sign_in(resource=RESOURCE)
    kid1 = jwt.get_unverified_header(first.access_token)["kid"]
    assert await v.verify_access_token(first.access_token, now())

    clock.t += 31
    kids = await b.rotate(keep=1)
    second = await b.sign_in(resource=RESOURCE)
    assert jwt.get_unverified_header(second.access_token)["kid"] == kids[0] != kid1
    assert await v.verify_access_token(second.access_token, now())  # refetch finds it

    clock.t += 5
    kids = await b.rotate(keep=1)  # the second rotation, 5 s later; kid1 unpublished
    third = await b.sign_in(resource=RESOURCE)
    assert jwt.get_unverified_header(third.access_token)["kid"] == kids[0]
    with pytest.raises(KeysUnavailable) as held:
        await v.verify_access_token(third.access_token, now())
    assert held.value.reason == "keys-unavailable" and held.value.retry_after_s == 25
    assert await v.verify_access_token(second.access_token, now())  # unaffected

    clock.t += 25
    assert (await v.verify_access_token(third.access_token, now())).subject == "u1-alice"
    with pytest.raises(TokenError, match="kid") as gone:  # withdrawn by the OP: a verdict
        await v.verify_access_token(first.access_token, now())
    assert gone.value.reason == "token-invalid"
    await src.aclose()
