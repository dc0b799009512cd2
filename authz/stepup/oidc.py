"""The OIDC relying-party side of the step-up round trip: discovery, the authorization
request (PKCE S256, nonce, acr_values, max_age, prompt=login) and the code exchange.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import aiohttp

from authz.core.reasons import Reason
from authz.errors import OidcError
from authz.stepup.profiles import IdpProfile, authorize_params


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    # RFC 9207: the IdP puts `iss` in every authorization response; one without it is then
    # refused (a mix-up attack strips or swaps it).
    iss_parameter_supported: bool = False
    # OpenID CIBA (authz.stepup.ciba): where backchannel authentication requests go.
    backchannel_authentication_endpoint: str | None = None
    backchannel_token_delivery_modes: tuple[str, ...] = ()
    # OIDC RP-Initiated Logout 1.0 (authz.stepup.logout): where the browser ends its IdP
    # session.
    end_session_endpoint: str | None = None
    # RFC 7662 / RFC 8414: where opaque access tokens are introspected (authz.check.
    # introspection), when oidc.introspection names no endpoint of its own.
    introspection_endpoint: str | None = None


def client_auth(client_id: str, client_secret: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(headers, form fields) authenticating the client at the IdP's token endpoint (and
    its backchannel endpoint): ``client_secret_basic`` when there is a secret (RFC 6749
    section 2.3.1: form-urlencode id and secret, then Basic), else ``client_id`` alone."""
    if client_secret is None:
        return {}, {"client_id": client_id}
    pair = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}, {}


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge) per RFC 7636 section 4.1-4.2."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


async def discover(
    issuer: str, session: aiohttp.ClientSession, timeout_s: float
) -> ProviderMetadata:
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                raise OidcError(f"discovery returned HTTP {resp.status}")
            doc = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise OidcError(f"discovery failed: {exc.__class__.__name__}") from exc
    if not isinstance(doc, dict) or doc.get("issuer") != issuer:
        # OpenID Connect Discovery 1.0 section 4.3: the issuer must match exactly.
        raise OidcError("discovery document issuer does not match the configured issuer")
    try:
        return ProviderMetadata(
            issuer=issuer,
            authorization_endpoint=str(doc["authorization_endpoint"]),
            token_endpoint=str(doc["token_endpoint"]),
            iss_parameter_supported=doc.get("authorization_response_iss_parameter_supported")
            is True,
            backchannel_authentication_endpoint=_optional_url(
                doc.get("backchannel_authentication_endpoint")
            ),
            backchannel_token_delivery_modes=_strings(
                doc.get("backchannel_token_delivery_modes_supported")
            ),
            end_session_endpoint=_optional_url(doc.get("end_session_endpoint")),
            introspection_endpoint=_optional_url(doc.get("introspection_endpoint")),
        )
    except KeyError as exc:
        raise OidcError(f"discovery document lacks {exc.args[0]}") from exc


def _optional_url(value: object) -> str | None:
    return value if isinstance(value, str) and value.startswith(("https://", "http://")) else None


def _strings(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


class RelyingParty(Protocol):
    """What the step-up endpoints ask of the OIDC client (``OidcClient``; a fake in tests)."""

    def authorize_url(
        self,
        *,
        state: str,
        nonce: str,
        code_challenge: str,
        acr_values: tuple[str, ...] = (),
        max_age: int | None = None,
        prompt_login: bool = False,
        login_hint: str | None = None,
        amr_any: frozenset[str] = frozenset(),
    ) -> str: ...

    async def exchange_code(self, code: str, verifier: str) -> dict[str, Any]: ...

    @property
    def requires_iss(self) -> bool:
        """Whether a callback without ``iss`` must be refused (RFC 9207 section 2.4)."""
        ...


class OidcClient:
    def __init__(
        self,
        *,
        metadata: ProviderMetadata,
        client_id: str,
        client_secret: str | None,
        redirect_uri: str,
        session: aiohttp.ClientSession,
        timeout_s: float,
        profile: IdpProfile | None = None,
    ) -> None:
        """``profile``: what the IdP needs in an authorization request for a level (scope,
        RFC 8707 ``resource``, ``acr_values`` or not, an OIDC Core 5.5 ``claims`` request;
        authz.stepup.profiles); None sends ``scope=openid`` and the acr values alone."""
        self.profile = profile
        self.metadata = metadata
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    @property
    def requires_iss(self) -> bool:
        return self.metadata.iss_parameter_supported

    def authorize_url(
        self,
        *,
        state: str,
        nonce: str,
        code_challenge: str,
        acr_values: tuple[str, ...] = (),
        max_age: int | None = None,
        prompt_login: bool = False,
        login_hint: str | None = None,
        amr_any: frozenset[str] = frozenset(),
    ) -> str:
        params: dict[str, str | tuple[str, ...]] = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": "openid",
            "state": state,
            "nonce": nonce,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
        }
        if self.profile is not None:
            # scope, resource, acr_values (unless the IdP ignores them) and claims
            params.update(
                authorize_params(
                    self.profile, acr=frozenset(acr_values), amr_any=amr_any, max_age=max_age
                )
            )
        elif acr_values:
            params["acr_values"] = " ".join(acr_values)
        if max_age is not None:
            params["max_age"] = str(max_age)
        if prompt_login:
            params["prompt"] = "login"
        if login_hint:
            params["login_hint"] = login_hint
        # doseq: `resource` may repeat (RFC 8707 section 2)
        return f"{self.metadata.authorization_endpoint}?{urlencode(params, doseq=True)}"

    async def exchange_code(self, code: str, verifier: str) -> dict[str, Any]:
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": verifier,
        }
        auth_headers, auth_fields = client_auth(self.client_id, self.client_secret)
        headers = {"Accept": "application/json", **auth_headers}
        data.update(auth_fields)
        try:
            async with self.session.post(
                self.metadata.token_endpoint, data=data, headers=headers, timeout=self.timeout
            ) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    error = body.get("error") if isinstance(body, dict) else None
                    raise OidcError(
                        f"token endpoint: HTTP {resp.status} {error or ''}".strip(),
                        reason=Reason.CODE_EXCHANGE_FAILED,
                    )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise OidcError(
                f"token endpoint unreachable: {exc.__class__.__name__}",
                reason=Reason.IDP_UNAVAILABLE,
            ) from exc
        if not isinstance(body, dict) or not isinstance(body.get("id_token"), str):
            raise OidcError("token response has no id_token", reason=Reason.CODE_EXCHANGE_FAILED)
        return body
