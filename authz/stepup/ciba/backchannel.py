"""The IdP side of a push step-up: OpenID CIBA Core 1.0, poll mode.

``authenticate`` sends the backchannel authentication request (section 7.1) to the IdP's
``backchannel_authentication_endpoint`` and reads its acknowledgement (7.3: ``auth_req_id``,
``expires_in``, ``interval``); ``poll`` asks the token endpoint once with the CIBA grant
type (10.1) and sorts the answer (11, 12): tokens, ``authorization_pending``, ``slow_down``,
``expired_token``, ``access_denied``, another refusal, or the IdP unreachable. The client
authenticates as it does for the code exchange (``authz.stepup.oidc.client_auth``).

Nothing here waits between polls or decides what an answer means for a grant: that is
``authz.stepup.ciba.flow``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import aiohttp

from authz.core.reasons import Reason
from authz.errors import OidcError
from authz.stepup.oidc import client_auth

GRANT_TYPE = "urn:openid:params:grant-type:ciba"
# auth_req_id: CIBA 7.3 asks for at least 128 bits of entropy, URL-safe; bounded here so a
# hostile IdP answer cannot bloat the stored record.
_AUTH_REQ_ID = re.compile(r"[!-~]{16,1024}")
_MAX_EXPIRES_IN = 86_400
_MAX_INTERVAL = 600


class BackchannelRefused(OidcError):
    """The IdP answered the request with an error (``idp_error``: ``unknown_user_id``,
    ``invalid_binding_message``, ``unauthorized_client`` ...), or with something that is
    not an acknowledgement."""

    def __init__(self, message: str, *, idp_error: str | None = None) -> None:
        self.idp_error = idp_error
        super().__init__(message, reason=Reason.IDP_ERROR)


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """The IdP took the request (CIBA 7.3)."""

    auth_req_id: str
    expires_in: int
    interval: int | None  # None: the IdP named none (CIBA says: then 5 seconds)


class Polled(StrEnum):
    TOKENS = "tokens"
    PENDING = "authorization_pending"
    SLOW_DOWN = "slow_down"
    EXPIRED = "expired_token"
    DENIED = "access_denied"
    REFUSED = "refused"  # another error: invalid_grant, invalid_client, ...
    UNAVAILABLE = "unavailable"  # no answer, a 5xx, or one that is not JSON


@dataclass(frozen=True, slots=True)
class PollResult:
    outcome: Polled
    tokens: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None  # the IdP's `error` code, or what was wrong with the answer


class Backchannel(Protocol):
    """What the flow asks of the IdP (``BackchannelClient``; a fake in unit tests)."""

    async def authenticate(self, params: Mapping[str, str]) -> Acknowledged: ...
    async def poll(self, auth_req_id: str) -> PollResult: ...


class BackchannelClient:
    def __init__(
        self,
        *,
        endpoint: str,
        token_endpoint: str,
        client_id: str,
        client_secret: str | None,
        session: aiohttp.ClientSession,
        timeout_s: float,
    ) -> None:
        self.endpoint = endpoint
        self.token_endpoint = token_endpoint
        self.client_id = client_id
        self.client_secret = client_secret
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def _post(self, url: str, fields: Mapping[str, str]) -> tuple[int, Any]:
        headers, auth_fields = client_auth(self.client_id, self.client_secret)
        data = {**fields, **auth_fields}
        async with self.session.post(
            url,
            data=data,
            headers={"Accept": "application/json", **headers},
            timeout=self.timeout,
            allow_redirects=False,
        ) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = None
            return resp.status, body

    async def authenticate(self, params: Mapping[str, str]) -> Acknowledged:
        try:
            status, body = await self._post(self.endpoint, params)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OidcError(
                f"backchannel endpoint unreachable: {exc.__class__.__name__}",
                reason=Reason.IDP_UNAVAILABLE,
            ) from exc
        if status >= 500 or body is None:
            raise OidcError(f"backchannel endpoint: HTTP {status}", reason=Reason.IDP_UNAVAILABLE)
        if status != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            code = error if isinstance(error, str) and len(error) <= 64 else None
            raise BackchannelRefused(
                f"backchannel request refused: HTTP {status} {code or ''}".strip(),
                idp_error=code,
            )
        return acknowledgement(body)

    async def poll(self, auth_req_id: str) -> PollResult:
        try:
            status, body = await self._post(
                self.token_endpoint, {"grant_type": GRANT_TYPE, "auth_req_id": auth_req_id}
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return PollResult(Polled.UNAVAILABLE, error=exc.__class__.__name__)
        return poll_result(status, body)


def acknowledgement(body: Mapping[str, Any]) -> Acknowledged:
    """CIBA 7.3's acknowledgement, typed strictly (BackchannelRefused otherwise)."""
    auth_req_id, expires_in = body.get("auth_req_id"), body.get("expires_in")
    interval = body.get("interval")
    if not isinstance(auth_req_id, str) or not _AUTH_REQ_ID.fullmatch(auth_req_id):
        raise BackchannelRefused("acknowledgement without a usable auth_req_id")
    if type(expires_in) is not int or not 0 < expires_in <= _MAX_EXPIRES_IN:
        raise BackchannelRefused("acknowledgement without a usable expires_in")
    if interval is not None and (type(interval) is not int or not 0 < interval <= _MAX_INTERVAL):
        raise BackchannelRefused("acknowledgement with an unusable interval")
    return Acknowledged(auth_req_id, expires_in, interval)


_ERRORS = {
    Polled.PENDING.value: Polled.PENDING,
    Polled.SLOW_DOWN.value: Polled.SLOW_DOWN,
    Polled.EXPIRED.value: Polled.EXPIRED,
    Polled.DENIED.value: Polled.DENIED,
}


def poll_result(status: int, body: Any) -> PollResult:
    """What one token-endpoint answer means (CIBA 11 and 12; RFC 6749 section 5.2). A
    5xx, a 429 or an answer that is not JSON is the IdP unavailable (tried again later)."""
    if status >= 500 or status == 429 or body is None:
        return PollResult(Polled.UNAVAILABLE, error=f"HTTP {status}")
    if not isinstance(body, dict):
        return PollResult(Polled.REFUSED, error="not a JSON object")
    if status == 200:
        if not isinstance(body.get("id_token"), str):
            return PollResult(Polled.REFUSED, error="token response without an id_token")
        return PollResult(Polled.TOKENS, tokens=body)
    error = body.get("error")
    if not isinstance(error, str):
        return PollResult(Polled.REFUSED, error=f"HTTP {status} without an error code")
    return PollResult(_ERRORS.get(error, Polled.REFUSED), error=error[:64])
