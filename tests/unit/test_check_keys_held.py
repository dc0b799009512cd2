"""A token whose key the service cannot fetch yet (the JWKS refetch held back by its rate
limit, e.g. a second key rotation inside the interval) is answered keys-unavailable with
a Retry-After, in both ext_authz modes: never invalid_token, never a login challenge."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.check.authorizer import Authorizer
from authz.check.request import attributes_from_check
from authz.check.response import HttpResponseBuilder, ResponseBuilder
from authz.config.policy_file import PolicyHolder
from authz.core.session import Identity
from authz.errors import KeysUnavailable
from authz.ops.metrics import Metrics
from authz.render import contract
from authz.store.memory import MemorySessionStore
from tests.builders import NOW, POLICY, FakeClock, check_request, response_header


class HeldKeys:
    """The verifier while the refetch that could find the token's key is held back."""

    def __init__(self, retry_after_s: int | None) -> None:
        self.retry_after_s = retry_after_s

    async def verify_access_token(self, token: str, now: int) -> Identity:
        raise KeysUnavailable("refetch rate-limited", retry_after_s=self.retry_after_s)


@pytest.mark.parametrize("retry_after_s", [25, None])
async def test_keys_held_back_is_keys_unavailable_with_retry_after(
    tmp_path: Path, retry_after_s: int | None
) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    clock = FakeClock(NOW)
    authorizer = Authorizer(
        policy=PolicyHolder(tmp_path / "policy.yaml"),
        tokens=HeldKeys(retry_after_s),
        store=MemorySessionStore(clock),
        metrics=Metrics(),
        token_cookie="stepup_token",
        leeway=0,
        clock=clock,
    )
    attrs = attributes_from_check(
        check_request("/accounts/1", {"authorization": "Bearer a.b.c", "accept": "text/html"})
    )
    result = await authorizer.check(attrs)
    assert result.decision.reason == "keys-unavailable"
    assert result.decision.retry_after_s == retry_after_s
    want = None if retry_after_s is None else str(retry_after_s)

    grpc = ResponseBuilder(error_status=503).build(result.decision, attrs, result.decision_id)
    assert grpc.denied_response.status.code == 503  # not a 302 to sign in, not a 401
    assert response_header(grpc, "x-stepup-reason") == "keys-unavailable"
    assert response_header(grpc, "retry-after") == want
    assert response_header(grpc, "www-authenticate") is None

    http = HttpResponseBuilder(error_status=503).build(result.decision, attrs, result.decision_id)
    assert http.status == 503
    assert dict(http.headers).get("retry-after") == want
    assert "www-authenticate" not in dict(http.headers)
    # HTTP mode: Envoy passes the header to the client only if the contract lists it.
    assert "retry-after" in contract.CLIENT_HEADERS
