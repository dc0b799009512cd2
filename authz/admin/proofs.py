"""Grant proofs: what a factor service signs to say it verified a user.

A transport credential (a certificate, a bearer secret) says who is calling; it must not
be enough to mint a grant. ``RecordGrant`` therefore carries a proof: a short-lived JWT
(compact JWS) signed with the caller's own key, whose public JWKS is in the caller's
settings. Claims:

==========  ================================================================
``iss``     the caller's ``proof.issuer``
``aud``     ``api.audience`` (default ``stepup-authz-api``)
``iat``     when it was signed; ``exp`` at most ``proof.max_lifetime_s`` later
``jti``     unique; a second use is refused (remembered until ``exp``)
``idp``     the user's issuer (a configured IdP the caller may assert for)
``sub``     the user's subject at that IdP
``sid``     the session it verified the user for
``level``   the policy level it asks a grant for
``acr``     what the factor proved; ``amr`` the RFC 8176 methods; ``auth_time`` when
==========  ================================================================

The request's user, session and level must equal the proof's. Verification uses the same
JWT verifier as access tokens (algorithm allowlist, exact ``iss``/``aud``, times with
leeway; keys only from the configured file), then the claims above are typed strictly.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from authz.admin.config import ApiSettings, CallerSettings
from authz.check.jwks import FileKeySource
from authz.check.tokens import TokenVerifier, evidence_from_claims
from authz.config.settings import OidcSettings
from authz.core.session import Evidence
from authz.errors import TokenError


class ProofError(Exception):
    """The proof is missing, invalid, expired, too long-lived or replayed."""


@dataclass(frozen=True, slots=True)
class GrantProof:
    caller: str
    jti: str
    expires_at: int
    issuer: str  # the user's issuer
    subject: str
    session_id: str
    level: str
    evidence: Evidence


class ProofVerifier:
    """Verifies one caller's proofs with that caller's keys."""

    def __init__(self, caller: CallerSettings, api: ApiSettings, *, leeway_s: int = 30) -> None:
        assert caller.proof is not None
        self.caller = caller
        self.proof = caller.proof
        self.keys = FileKeySource(self.proof.jwks_file)
        self._verifier = TokenVerifier(
            OidcSettings(
                issuer=self.proof.issuer,
                client_id=caller.name,
                audience=api.audience,
                algorithms=self.proof.algorithms,
                jwks_file=self.proof.jwks_file,
                leeway_s=leeway_s,
                token_cache_size=0,
            ),
            self.keys,
        )
        self.audience = api.audience

    async def start(self) -> None:
        await self.keys.start()

    async def aclose(self) -> None:
        await self.keys.aclose()

    async def verify(self, token: str, now: int) -> GrantProof:
        if not token:
            raise ProofError("a grant needs a proof signed by the caller (RecordGrant.proof)")
        try:
            claims = await self._verifier.verify_claims(
                token, now, audience=self.audience, typ=None
            )
            evidence = evidence_from_claims(claims)
        except TokenError as exc:
            raise ProofError(f"proof refused: {exc}") from None
        iat, exp = claims["iat"], claims["exp"]
        if exp - iat > self.proof.max_lifetime_s:
            raise ProofError(
                f"proof lives {exp - iat} s; at most {self.proof.max_lifetime_s} s is accepted"
            )
        fields = {n: claims.get(n) for n in ("jti", "idp", "sid", "level")}
        bad = [n for n, v in fields.items() if not isinstance(v, str) or not v or len(v) > 256]
        if bad:
            raise ProofError(f"proof claims missing or invalid: {', '.join(bad)}")
        if evidence.auth_time is None:
            raise ProofError("proof claims missing or invalid: auth_time")
        return GrantProof(
            caller=self.caller.name,
            jti=str(fields["jti"]),
            expires_at=int(exp),
            issuer=str(fields["idp"]),
            subject=str(claims["sub"]),
            session_id=str(fields["sid"]),
            level=str(fields["level"]),
            evidence=evidence,
        )


def replay_key(proof: GrantProof) -> str:
    """The store key that remembers a proof's ``jti`` (per caller, hashed)."""
    digest = hashlib.sha256(f"{proof.caller}\x00{proof.jti}".encode()).hexdigest()[:40]
    return f"jti:{digest}"


def sign_proof(
    private_key_pem: bytes,
    *,
    issuer: str,
    audience: str,
    user_issuer: str,
    subject: str,
    session_id: str,
    level: str,
    acr: str,
    amr: list[str],
    auth_time: int,
    kid: str | None = None,
    now: int | None = None,
    lifetime_s: int = 120,
    jti: str | None = None,
) -> str:
    """A proof as a factor service would sign it (``stepup-authz sessions proof``, tests)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = "ES256"
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        alg = "EdDSA"
    elif isinstance(key, rsa.RSAPrivateKey):
        alg = "RS256"
    else:
        raise ValueError("an EC P-256, Ed25519 or RSA private key is needed")
    t = int(time.time()) if now is None else now
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "iat": t,
        "exp": t + lifetime_s,
        "jti": jti or uuid.uuid4().hex,
        "idp": user_issuer,
        "sub": subject,
        "sid": session_id,
        "level": level,
        "acr": acr,
        "amr": amr,
        "auth_time": auth_time,
    }
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def public_jwks(private_key_pem: bytes, kid: str) -> dict[str, Any]:
    """The public JWKS (one key) of a private key, for a caller's ``proof.jwks_file``."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_key_pem, password=None)
    algorithm = jwt.algorithms.get_default_algorithms()[_alg_of(key)]
    jwk: Mapping[str, Any] = json.loads(algorithm.to_jwk(key.public_key()))
    return {"keys": [{**jwk, "kid": kid, "use": "sig"}]}


def _alg_of(key: object) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    return "RS256"
