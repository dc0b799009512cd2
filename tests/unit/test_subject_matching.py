""" "Same user" between the access token and the step-up's ID token is the profile's claim
pair (generic sub/sub, Okta uid/sub, Entra oid/oid), read by the real verifier from real
signed tokens and compared by the one grant rule: exact, and never a weaker claim standing
in for a missing one."""

from __future__ import annotations

from typing import Any

import pytest

from authz.check.tokens import StaticKeySource, TokenVerifier
from authz.config.settings import OidcSettings
from authz.core.grants import GrantRefused, Proof, Target, grant_for
from authz.core.policy import load_policy
from authz.errors import TokenError
from tests.builders import AUDIENCE, CLIENT_ID, DROP, ISSUER, NOW, jwks, rsa_key, sign

KEY = rsa_key("k1")
C = CLIENT_ID
OK, NO = "granted", "subject-mismatch"
ELEVATED = load_policy(
    {"levels": {"elevated": {"acr": ["mfa"], "max_age": 900}}, "default_level": "elevated"}
).by_name["elevated"]
PROFILES: dict[str, Any] = {
    "generic": "generic",
    "okta": "okta",
    "entra": {"name": "entra", "auth_contexts": [{"id": "c1", "acr": "mfa"}]},
}


def verifier(profile: str) -> TokenVerifier:
    s = OidcSettings(
        issuer=ISSUER, client_id=CLIENT_ID, audience=AUDIENCE, profile=PROFILES[profile]
    )
    return TokenVerifier(s, StaticKeySource(jwks(KEY)))


def access(**over: Any) -> str:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "iat": NOW, "exp": NOW + 600, "sid": "s1"}
    claims.update(over)
    return sign(KEY, {k: v for k, v in claims.items() if v is not DROP})


def id_token(**over: Any) -> str:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": CLIENT_ID,
        "iat": NOW,
        "exp": NOW + 600,
        "nonce": "n",
        "acr": "mfa",
        "acrs": ["c1"],
        "auth_time": NOW - 5,
    }
    claims.update(over)
    return sign(KEY, {k: v for k, v in claims.items() if v is not DROP})


async def stepped_up(profile: str, at: str, idt: str) -> str:
    """The grant rule's answer for the session of ``at`` proved by ``idt``."""
    v = verifier(profile)
    who = await v.verify_access_token(at, NOW)
    proved = await v.verify_id_token(idt, NOW, nonce="n")
    try:
        grant_for(
            ELEVATED,
            Target(who.issuer, who.subject),
            Proof(proved.issuer, proved.subject, proved.evidence, challenged_at=NOW - 60),
            now=NOW,
            leeway=30,
            default_ttl_s=900,
        )
    except GrantRefused as exc:
        return str(exc.reason)
    return "granted"


@pytest.mark.parametrize(
    ("profile", "at", "idt", "result"),
    [
        ("generic", access(sub="u1"), id_token(sub="u1"), OK),
        ("generic", access(sub="u1"), id_token(sub="u2"), NO),
        # Okta: the access token's `sub` is the login, `uid` the user id (the ID token's sub)
        ("okta", access(sub="alice@x", uid="00u1", cid=C), id_token(sub="00u1"), OK),
        ("okta", access(sub="00u1", uid="00u2", cid=C), id_token(sub="00u1"), NO),
        # Entra: `sub` is pairwise (per application), `oid` the user in both tokens
        ("entra", access(sub="pw-api", oid="oid-1"), id_token(sub="pw-app", oid="oid-1"), OK),
        ("entra", access(sub="pw-api", oid="oid-1"), id_token(sub="oid-1", oid="oid-2"), NO),
        ("entra", access(sub="x", oid="oid-1"), id_token(sub="x", oid="OID-1"), NO),
    ],
)
async def test_same_user_is_the_profiles_claim_pair(
    profile: str, at: str, idt: str, result: str
) -> None:
    assert await stepped_up(profile, at, idt) == result


async def test_an_id_token_without_the_profiles_user_claim_is_refused_not_matched_on_sub() -> None:
    """Entra without `oid` in the ID token: its `sub` equal to the access token's oid must
    not stand in for it."""
    with pytest.raises(TokenError, match="missing `oid`"):
        await stepped_up("entra", access(sub="x", oid="oid-1"), id_token(sub="oid-1", oid=DROP))
    with pytest.raises(TokenError, match="`oid` is not a string"):
        await stepped_up("entra", access(sub="x", oid="oid-1"), id_token(sub="x", oid=["oid-1"]))
