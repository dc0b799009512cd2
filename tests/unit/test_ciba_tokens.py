"""The ID token of a CIBA token response, verified by the real verifier with real
signatures: the code flow's rules without the nonce, and bound to its auth_req_id."""

from __future__ import annotations

from typing import Any

import pytest

from authz.check.tokens import AUTH_REQ_ID_CLAIM, StaticKeySource, TokenVerifier
from authz.config.settings import OidcSettings
from authz.errors import TokenError
from tests.builders import AUDIENCE, CLIENT_ID, DROP, ISSUER, NOW, jwks, rsa_key, sign

KEY = rsa_key("k1")
OTHER = rsa_key("k2")
REQ = "auth-req-0123456789abcdef"


def verifier() -> TokenVerifier:
    settings = OidcSettings(issuer=ISSUER, client_id=CLIENT_ID, audience=AUDIENCE)
    return TokenVerifier(settings, StaticKeySource(jwks(KEY)))


def id_claims(**over: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": CLIENT_ID,
        "sub": "alice",
        "iat": NOW,
        "exp": NOW + 300,
        "acr": "mfa",
        "amr": ["pwd", "otp"],
        "auth_time": NOW - 5,
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not DROP}


async def test_a_backchannel_id_token_verifies_without_a_nonce() -> None:
    token = await verifier().verify_backchannel_id_token(
        sign(KEY, id_claims()), NOW, auth_req_id=REQ
    )
    assert (token.subject, token.evidence.acr, token.evidence.auth_time) == (
        "alice",
        "mfa",
        NOW - 5,
    )
    bound = await verifier().verify_backchannel_id_token(
        sign(KEY, id_claims(**{AUTH_REQ_ID_CLAIM: REQ})), NOW, auth_req_id=REQ
    )
    assert bound.claims[AUTH_REQ_ID_CLAIM] == REQ


@pytest.mark.parametrize(
    ("claims", "key", "message"),
    [
        # An ID token from a front-channel sign-in (it carries that request's nonce).
        (id_claims(nonce="n-123"), KEY, "`nonce` in a backchannel ID token"),
        # Swapped: the ID token of another backchannel request.
        (id_claims(**{AUTH_REQ_ID_CLAIM: "auth-req-of-someone-else"}), KEY, "names another"),
        (id_claims(**{AUTH_REQ_ID_CLAIM: 7}), KEY, "names another"),
        (id_claims(aud="another-client"), KEY, "`aud` mismatch"),
        (id_claims(aud=[CLIENT_ID, "x"]), KEY, "several audiences"),
        (id_claims(azp="another-client"), KEY, "`azp`"),
        (id_claims(iss="https://evil.example"), KEY, "`iss` mismatch"),
        (id_claims(exp=NOW - 60), KEY, "expired"),
        (id_claims(), OTHER, "no key"),
    ],
)
async def test_what_is_not_this_requests_id_token_is_refused(
    claims: dict[str, Any], key: Any, message: str
) -> None:
    with pytest.raises(TokenError) as err:
        await verifier().verify_backchannel_id_token(sign(key, claims), NOW, auth_req_id=REQ)
    assert message in str(err.value)


async def test_an_empty_auth_req_id_never_disables_the_check() -> None:
    with pytest.raises(TokenError):
        await verifier().verify_backchannel_id_token(sign(KEY, id_claims()), NOW, auth_req_id="")


async def test_the_code_flow_still_needs_its_nonce() -> None:
    v = verifier()
    with pytest.raises(TokenError):
        await v.verify_id_token(sign(KEY, id_claims()), NOW, nonce="n-123")
    token = await v.verify_id_token(sign(KEY, id_claims(nonce="n-123")), NOW, nonce="n-123")
    assert token.subject == "alice"
