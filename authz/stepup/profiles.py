"""IdP profiles: what each identity provider needs sent, and where it puts what it proved.

A profile is plain data (no I/O): the scope, RFC 8707 ``resource`` and OIDC Core 5.5
``claims`` request that go with a step-up, which claims carry acr / amr / auth_time / sid,
the claim pair that makes an access token and an ID token "the same user", the claims that
name the client, the accepted ``typ`` headers and the challenge API clients get. The five
profiles below are documented in ``docs/idp/<name>.md``; ``oidc.profile`` in the settings
selects one and may override any part.

Entra ID does not read ``acr_values``: a level maps to a Conditional Access
*authentication context* (``c1``..``c99``), requested through ``claims`` and returned as the
``acrs`` list claim. ``oidc.profile.auth_contexts`` names them weakest first, each with the
policy acr it proves; the strongest context present in ``acrs`` becomes the evidence's acr.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from authz.config.settings import OidcSettings
from authz.core.session import Evidence
from authz.errors import ConfigError

Challenge = Literal["rfc9470", "claims", "both"]
ACRS = "acrs"  # Entra's list claim of satisfied authentication contexts


class ClaimError(ValueError):
    """A claim the profile reads has the wrong type; the message names the claim."""


@dataclass(frozen=True, slots=True)
class AuthContext:
    id: str  # c1..c99
    acr: str  # the policy acr value this context proves


@dataclass(frozen=True, slots=True)
class IdpProfile:
    name: str
    scope: tuple[str, ...]
    claims_request: bool
    send_acr_values: bool
    acr_claim: str
    # (claim of the access token that is the user, claim of the ID token that must equal it)
    subject_claims: tuple[str, str]
    client_claims: tuple[str, ...]
    challenge: Challenge
    token_typ: tuple[str | None, ...] | None  # None: not checked
    resource: tuple[str, ...] = ()
    amr_claim: str = "amr"
    auth_time_claim: str = "auth_time"
    sid_claim: str = "sid"
    auth_contexts: tuple[AuthContext, ...] = ()
    authorization_uri: str | None = None
    ciba: bool = True  # the IdP offers OpenID CIBA (docs/idp/<name>.md)


PROFILES: dict[str, IdpProfile] = {
    # RFC 9068 / OIDC Core as written; what the service did before profiles existed.
    "generic": IdpProfile(
        name="generic",
        scope=("openid",),
        claims_request=False,
        send_acr_values=True,
        acr_claim="acr",
        subject_claims=("sub", "sub"),
        client_claims=("client_id", "azp"),
        challenge="rfc9470",
        token_typ=None,
    ),
    # Okta custom authorization server: access-token `sub` is the login, `uid` the user id
    # (the ID token's `sub`); the client is `cid`; access tokens carry no `amr`.
    "okta": IdpProfile(
        name="okta",
        scope=("openid",),
        claims_request=False,
        send_acr_values=True,
        acr_claim="acr",
        subject_claims=("uid", "sub"),
        client_claims=("cid",),
        challenge="rfc9470",
        token_typ=(None, "JWT", "at+jwt"),
    ),
    # Entra ID v2 tokens: `typ` JWT, user `oid` (`sub` is pairwise per application), client
    # `azp` (v1: `appid`), step-up as authentication contexts in `acrs`.
    "entra": IdpProfile(
        name="entra",
        scope=("openid", "profile"),
        claims_request=True,
        send_acr_values=False,
        acr_claim=ACRS,
        subject_claims=("oid", "oid"),
        client_claims=("azp", "appid"),
        challenge="claims",
        token_typ=("JWT",),
        ciba=False,
    ),
    # Keycloak: `typ` JWT (at+jwt with the client's RFC 9068 option), `azp`, acr from the
    # realm's ACR-to-LoA mapping, `amr` from the AMR mapper, `sid` in both tokens.
    "keycloak": IdpProfile(
        name="keycloak",
        scope=("openid",),
        claims_request=True,
        send_acr_values=True,
        acr_claim="acr",
        subject_claims=("sub", "sub"),
        client_claims=("azp",),
        challenge="rfc9470",
        token_typ=("JWT", "at+jwt"),
    ),
    # PingOne / PingFederate: acr_values names a sign-on policy and `acr` returns it;
    # PingOne access tokens may carry `typ` at+jwt (always from March 2027).
    "ping": IdpProfile(
        name="ping",
        scope=("openid",),
        claims_request=False,
        send_acr_values=True,
        acr_claim="acr",
        subject_claims=("sub", "sub"),
        client_claims=("client_id",),
        challenge="rfc9470",
        token_typ=("at+jwt", None),
    ),
}


def resolve(settings: OidcSettings) -> IdpProfile:
    """The selected profile with the settings' overrides applied; ConfigError if the
    combination cannot work (an ``acrs`` profile without authentication contexts)."""
    p = settings.profile
    base = PROFILES[p.name]
    over: dict[str, Any] = {
        k: getattr(p, k)
        for k in (
            "scope",
            "claims_request",
            "send_acr_values",
            "acr_claim",
            "amr_claim",
            "auth_time_claim",
            "sid_claim",
            "subject_claims",
            "client_claims",
            "challenge",
            "authorization_uri",
        )
        if getattr(p, k) is not None
    }
    if p.resource:
        over["resource"] = p.resource
    if p.auth_contexts:
        over["auth_contexts"] = tuple(AuthContext(c.id, c.acr) for c in p.auth_contexts)
    if settings.token_typ_set:
        over["token_typ"] = settings.token_typ
    profile = dataclasses.replace(base, **over)
    if "openid" not in profile.scope:
        raise ConfigError("oidc.profile.scope must contain openid", location="oidc.profile")
    if profile.acr_claim == ACRS and not profile.auth_contexts:
        raise ConfigError(
            "the acrs claim needs oidc.profile.auth_contexts (id c1..c99 -> policy acr)",
            location="oidc.profile.auth_contexts",
        )
    ids = [c.id for c in profile.auth_contexts]
    if len(set(ids)) != len(ids):
        raise ConfigError("oidc.profile.auth_contexts repeats an id", location="oidc.profile")
    return profile


# -- what to send ----------------------------------------------------------------------


def context_for(profile: IdpProfile, acr_values: frozenset[str] | tuple[str, ...]) -> str | None:
    """The weakest authentication context that proves one of the level's acr values."""
    for ctx in profile.auth_contexts:
        if ctx.acr in acr_values:
            return ctx.id
    return None


def claims_request(
    profile: IdpProfile,
    *,
    acr: frozenset[str],
    amr_any: frozenset[str],
    max_age: int | None,
    targets: tuple[str, ...] = ("id_token",),
) -> dict[str, Any] | None:
    """The OIDC Core 5.5 ``claims`` request for a level, or None when nothing to ask.

    ``acr`` essential with the level's values (5.5.1.1), ``amr`` essential when the level
    names methods, ``auth_time`` essential when it has a ``max_age``. With ``acrs`` the
    level's weakest authentication context is asked for instead, as Entra documents it
    (``{"acrs": {"essential": true, "value": "c1"}}``).
    """
    member: dict[str, Any] = {}
    if profile.acr_claim == ACRS:
        ctx = context_for(profile, acr)
        if ctx is not None:
            member[ACRS] = {"essential": True, "value": ctx}
    elif acr:
        member[profile.acr_claim] = {"essential": True, "values": sorted(acr)}
    if amr_any:
        member[profile.amr_claim] = {"essential": True}
    if max_age is not None:
        member[profile.auth_time_claim] = {"essential": True}
    if not member:
        return None
    return {target: dict(member) for target in targets}


def authorize_params(
    profile: IdpProfile,
    *,
    acr: frozenset[str] = frozenset(),
    amr_any: frozenset[str] = frozenset(),
    max_age: int | None = None,
) -> dict[str, str | tuple[str, ...]]:
    """What the profile adds to an authorization request for a level (none for a plain
    sign-in): ``scope``, ``resource`` (repeatable, RFC 8707 section 2), ``acr_values`` and
    ``claims``. ``max_age``, ``prompt``, PKCE, state and nonce stay with the caller."""
    out: dict[str, str | tuple[str, ...]] = {"scope": " ".join(profile.scope)}
    if profile.resource:
        out["resource"] = profile.resource
    if acr and profile.send_acr_values:
        out["acr_values"] = " ".join(sorted(acr))
    if profile.claims_request:
        targets: tuple[str, ...] = ("id_token",)
        if profile.acr_claim == ACRS:  # the API's token must carry the context too
            targets = ("id_token", "access_token")
        req = claims_request(profile, acr=acr, amr_any=amr_any, max_age=max_age, targets=targets)
        if req is not None:
            out["claims"] = json.dumps(req, separators=(",", ":"), sort_keys=True)
    return out


# -- what came back --------------------------------------------------------------------


def _str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is not None and not isinstance(value, str):
        raise ClaimError(f"`{name}` is not a string")
    return value


def _str_list(claims: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ClaimError(f"`{name}` is not a list of strings")
    return tuple(value)


def read_acr(profile: IdpProfile, claims: Mapping[str, Any]) -> str | None:
    """The acr a token proves. With ``acrs``: the policy acr of the strongest configured
    authentication context in the list (an unknown context proves nothing)."""
    if profile.acr_claim != ACRS:
        return _str(claims, profile.acr_claim)
    present = set(_str_list(claims, ACRS))
    acr = None
    for ctx in profile.auth_contexts:  # weakest first: the last match is the strongest
        if ctx.id in present:
            acr = ctx.acr
    return acr


def read_evidence(profile: IdpProfile, claims: Mapping[str, Any]) -> Evidence:
    """acr, amr and auth_time from the profile's claims, typed strictly (ClaimError)."""
    auth_time = claims.get(profile.auth_time_claim)
    if auth_time is not None and type(auth_time) is not int:
        raise ClaimError(f"`{profile.auth_time_claim}` is not an integer")
    return Evidence(
        acr=read_acr(profile, claims),
        amr=_str_list(claims, profile.amr_claim),
        auth_time=auth_time,
    )


def missing_evidence(
    evidence: Evidence, *, acr: frozenset[str], amr_any: frozenset[str], max_age: int | None
) -> tuple[str, ...]:
    """Which of acr, amr, auth_time the evidence lacks for a level (for the refusal
    reason and its audit record: "acr was right, amr was missing")."""
    out = []
    if acr and evidence.acr is None:
        out.append("acr")
    if amr_any and not evidence.amr:
        out.append("amr")
    if max_age is not None and evidence.auth_time is None:
        out.append("auth_time")
    return tuple(out)


def subject_of(profile: IdpProfile, access_claims: Mapping[str, Any]) -> str | None:
    """The user named by an access token (its first subject claim)."""
    value = access_claims.get(profile.subject_claims[0])
    return value if isinstance(value, str) and value else None


def same_subject(profile: IdpProfile, access_subject: str, id_claims: Mapping[str, Any]) -> bool:
    """Whether an ID token is about the user the access token named: its second subject
    claim equals, exactly (no case folding, no fallback to another claim)."""
    value = id_claims.get(profile.subject_claims[1])
    if not isinstance(value, str) or not value or not access_subject:
        return False
    return hmac.compare_digest(value.encode(), access_subject.encode())


def client_of(profile: IdpProfile, claims: Mapping[str, Any]) -> str | None:
    """The client an access token was issued to: the first of the profile's client claims
    present (ClaimError if it is not a string)."""
    for name in profile.client_claims:
        if name in claims:
            return _str(claims, name)
    return None


# -- the challenge API clients get -----------------------------------------------------


def claims_challenge_value(profile: IdpProfile, acr_values: tuple[str, ...]) -> str | None:
    """Base64 of the ``claims`` an API client must request (Entra's claims challenge), or
    None when the level maps to no authentication context."""
    if profile.acr_claim == ACRS:
        ctx = context_for(profile, acr_values)
        if ctx is None:
            return None
        doc: dict[str, Any] = {"access_token": {ACRS: {"essential": True, "value": ctx}}}
    else:
        if not acr_values:
            return None
        doc = {"access_token": {profile.acr_claim: {"essential": True, "values": list(acr_values)}}}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return base64.b64encode(raw).decode("ascii")


def challenge_builder(
    profile: IdpProfile,
    *,
    authorization_uri: str,
    rfc9470: Callable[[tuple[str, ...], int | None], str],
) -> Callable[[tuple[str, ...], int | None], str]:
    """The ``WWW-Authenticate`` builder for step-up denials (the ``challenge=`` argument of
    ``authz.check.response.denial``): RFC 9470, Entra's ``insufficient_claims`` claims
    challenge, or both challenges in one field value (RFC 9110 section 11.6.1). A level
    without a claims challenge falls back to RFC 9470."""
    uri = profile.authorization_uri or authorization_uri
    mode = profile.challenge

    def build(acr_values: tuple[str, ...], max_age: int | None) -> str:
        standard = rfc9470(acr_values, max_age)
        if mode == "rfc9470":
            return standard
        value = claims_challenge_value(profile, acr_values)
        if value is None:
            return standard
        claims = (
            f'Bearer realm="", authorization_uri="{uri}", '
            f'error="insufficient_claims", claims="{value}"'
        )
        return claims if mode == "claims" else f"{standard}, {claims}"

    return build
