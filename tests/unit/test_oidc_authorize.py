"""The authorization request the step-up sends: what the IdP profile says a level needs
(scope, RFC 8707 resource, acr_values or not, an OIDC Core 5.5 claims request)."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import aiohttp

from authz.config.settings import OidcSettings
from authz.stepup import profiles
from authz.stepup.oidc import OidcClient, ProviderMetadata

ISS = "https://idp.example"
META = ProviderMetadata(
    issuer=ISS, authorization_endpoint=f"{ISS}/authorize", token_endpoint=f"{ISS}/token"
)


async def _query(settings: OidcSettings | None, **kw: object) -> dict[str, list[str]]:
    async with aiohttp.ClientSession() as http:
        client = OidcClient(
            metadata=META,
            client_id="stepup-authz",
            client_secret="s",
            redirect_uri="https://app.example/_stepup/callback",
            session=http,
            timeout_s=1,
            profile=profiles.resolve(settings) if settings is not None else None,
        )
        url = client.authorize_url(state="st", nonce="n", code_challenge="c", **kw)  # type: ignore[arg-type]
    return parse_qs(urlsplit(url).query)


def _settings(**over: object) -> OidcSettings:
    return OidcSettings.model_validate(
        {"issuer": ISS, "client_id": "stepup-authz", "audience": "api", **over}
    )


async def test_without_a_profile_only_openid_and_the_acr_values() -> None:
    q = await _query(None, acr_values=("mfa",), max_age=300)
    assert q["scope"] == ["openid"] and q["acr_values"] == ["mfa"] and q["max_age"] == ["300"]
    assert "claims" not in q and "resource" not in q


async def test_the_profiles_scope_resource_and_claims_go_with_a_step_up() -> None:
    s = _settings(
        profile={
            "name": "generic",
            "scope": ["openid", "profile"],
            "resource": ["https://api.example/", "https://wires.example/"],
            "claims_request": True,
        }
    )
    q = await _query(
        s, acr_values=("mfa", "phr"), max_age=300, amr_any=frozenset({"hwk"}), prompt_login=True
    )
    assert q["scope"] == ["openid profile"]
    assert q["resource"] == ["https://api.example/", "https://wires.example/"]  # repeated
    assert q["acr_values"] == ["mfa phr"]
    claims = json.loads(q["claims"][0])
    assert claims["id_token"]["acr"] == {"essential": True, "values": ["mfa", "phr"]}
    assert claims["id_token"]["amr"] == {"essential": True}
    assert claims["id_token"]["auth_time"] == {"essential": True}
    assert q["prompt"] == ["login"] and q["max_age"] == ["300"]


async def test_a_plain_sign_in_asks_for_no_claims() -> None:
    q = await _query(_settings(profile={"name": "generic", "claims_request": True}))
    assert q["scope"] == ["openid"] and "claims" not in q and "acr_values" not in q
