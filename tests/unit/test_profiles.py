"""IdP profiles (authz.stepup.profiles): what each sends, reads and answers; pure, no I/O."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from authz.check.response import rfc9470_challenge
from authz.config.settings import OidcSettings
from authz.core.session import Evidence
from authz.errors import ConfigError
from authz.stepup import profiles as p

CONTEXTS = [{"id": "c1", "acr": "mfa"}, {"id": "c2", "acr": "phr"}]


def oidc(profile: Any = "generic", **over: Any) -> OidcSettings:
    return OidcSettings(
        issuer="https://idp.example.com", client_id="c", audience="api", profile=profile, **over
    )


def entra(**over: Any) -> p.IdpProfile:
    return p.resolve(oidc({"name": "entra", "auth_contexts": CONTEXTS, **over}))


def test_every_profile_resolves_and_keeps_openid() -> None:
    for name in ("generic", "okta", "keycloak", "ping"):
        prof = p.resolve(oidc(name))
        assert prof.name == name and "openid" in prof.scope
    assert entra().challenge == "claims"
    with pytest.raises(ConfigError, match="auth_contexts"):
        p.resolve(oidc("entra"))  # acrs without contexts cannot map a level
    with pytest.raises(ConfigError, match="openid"):
        p.resolve(oidc({"name": "generic", "scope": ["profile"]}))
    with pytest.raises(ConfigError, match="repeats"):
        p.resolve(oidc({"name": "entra", "auth_contexts": [CONTEXTS[0], CONTEXTS[0]]}))


def test_overrides_and_token_typ_precedence() -> None:
    prof = p.resolve(
        oidc({"name": "okta", "subject_claims": ["sub", "sub"], "scope": ["openid", "profile"]})
    )
    assert prof.subject_claims == ("sub", "sub") and prof.scope == ("openid", "profile")
    assert p.resolve(oidc("keycloak")).token_typ == ("JWT", "at+jwt")
    assert p.resolve(oidc("keycloak", token_typ="at+jwt")).token_typ == ("at+jwt",)
    assert p.resolve(oidc("keycloak", token_typ=None)).token_typ is None  # explicitly off


def test_bad_settings_refused() -> None:
    with pytest.raises(ValueError, match="absolute URI"):
        oidc({"name": "generic", "resource": ["trading-api"]})
    with pytest.raises(ValueError, match="pattern"):
        oidc({"name": "entra", "auth_contexts": [{"id": "c100", "acr": "mfa"}]})
    with pytest.raises(ValueError, match="Input should be"):
        oidc("auth0")


def test_generic_sends_what_it_always_sent() -> None:
    params = p.authorize_params(
        p.resolve(oidc()), acr=frozenset({"mfa", "phr"}), amr_any=frozenset({"hwk"}), max_age=300
    )
    assert params == {"scope": "openid", "acr_values": "mfa phr"}


def test_claims_request_for_a_level() -> None:
    prof = p.resolve(
        oidc({"name": "generic", "claims_request": True, "resource": ["https://api.example/t"]})
    )
    params = p.authorize_params(
        prof, acr=frozenset({"phr"}), amr_any=frozenset({"hwk"}), max_age=300
    )
    assert params["resource"] == ("https://api.example/t",)
    assert json.loads(str(params["claims"])) == {
        "id_token": {
            "acr": {"essential": True, "values": ["phr"]},
            "amr": {"essential": True},
            "auth_time": {"essential": True},
        }
    }
    # a plain sign-in asks for nothing extra
    assert p.authorize_params(prof) == {"scope": "openid", "resource": ("https://api.example/t",)}


def test_entra_asks_for_the_weakest_context_in_both_tokens() -> None:
    params = p.authorize_params(entra(), acr=frozenset({"mfa", "phr"}), max_age=900)
    assert "acr_values" not in params  # Entra ignores it
    claims = json.loads(str(params["claims"]))
    want = {"acrs": {"essential": True, "value": "c1"}, "auth_time": {"essential": True}}
    assert claims == {"id_token": want, "access_token": want}
    assert p.context_for(entra(), frozenset({"phr"})) == "c2"
    assert p.context_for(entra(), frozenset({"pwd"})) is None


def test_read_evidence_per_profile() -> None:
    claims = {"acr": "mfa", "amr": ["pwd", "otp"], "auth_time": 5, "acrs": ["c2", "c1"]}
    assert p.read_evidence(p.resolve(oidc()), claims) == Evidence("mfa", ("pwd", "otp"), 5)
    assert p.read_evidence(entra(), claims).acr == "phr"  # the strongest known context
    assert p.read_evidence(entra(), {"acr": "mfa", "acrs": ["c7"]}).acr is None  # not acr!
    for bad in ({"amr": "pwd"}, {"auth_time": "5"}, {"auth_time": True}, {"acr": 1}):
        with pytest.raises(p.ClaimError):
            p.read_evidence(p.resolve(oidc()), bad)


def test_missing_evidence_names_the_claim() -> None:
    ev = Evidence("phr", (), None)
    missing = p.missing_evidence(
        ev, acr=frozenset({"phr"}), amr_any=frozenset({"hwk"}), max_age=300
    )
    assert missing == ("amr", "auth_time")
    assert p.missing_evidence(ev, acr=frozenset(), amr_any=frozenset(), max_age=None) == ()


def test_subject_matching_is_exact_and_per_profile() -> None:
    okta = p.resolve(oidc("okta"))
    access = {"sub": "alice@example.com", "uid": "00u1"}
    assert p.subject_of(okta, access) == "00u1"
    assert p.same_subject(okta, "00u1", {"sub": "00u1"})
    assert not p.same_subject(okta, "00u1", {"sub": "00U1"})  # no case folding
    assert not p.same_subject(okta, "00u1", {"uid": "00u1"})  # never another claim
    assert not p.same_subject(okta, "", {"sub": ""})
    generic = p.resolve(oidc())
    assert not p.same_subject(generic, "00u1", {"sub": "alice@example.com"})
    assert p.subject_of(entra(), {"sub": "pairwise", "oid": "o-1"}) == "o-1"


def test_client_claims() -> None:
    assert p.client_of(p.resolve(oidc("okta")), {"cid": "0oa", "client_id": "x"}) == "0oa"
    assert p.client_of(entra(), {"appid": "v1-app"}) == "v1-app"
    with pytest.raises(p.ClaimError):
        p.client_of(p.resolve(oidc()), {"client_id": ["a"]})


def _decode_claims(header: str) -> Any:
    value = header.split('claims="')[1].split('"')[0]
    return json.loads(base64.b64decode(value))


def test_entra_claims_challenge() -> None:
    build = p.challenge_builder(
        entra(), authorization_uri="https://login.example/authorize", rfc9470=rfc9470_challenge
    )
    www = build(("mfa", "phr"), 900)
    assert www.startswith('Bearer realm="", authorization_uri="https://login.example/authorize"')
    assert 'error="insufficient_claims"' in www
    assert _decode_claims(www) == {"access_token": {"acrs": {"essential": True, "value": "c1"}}}
    # a level no context maps to falls back to RFC 9470
    assert build(("pwd",), None) == rfc9470_challenge(("pwd",), None)


def test_challenge_modes() -> None:
    uri = "https://idp/authorize"
    std = p.challenge_builder(p.resolve(oidc()), authorization_uri=uri, rfc9470=rfc9470_challenge)
    assert std(("mfa",), 60) == rfc9470_challenge(("mfa",), 60)
    both = p.challenge_builder(
        p.resolve(oidc({"name": "generic", "challenge": "both"})),
        authorization_uri=uri,
        rfc9470=rfc9470_challenge,
    )
    www = both(("mfa",), 60)
    assert www.startswith(rfc9470_challenge(("mfa",), 60) + ", Bearer ")
    assert _decode_claims(www) == {"access_token": {"acr": {"essential": True, "values": ["mfa"]}}}
