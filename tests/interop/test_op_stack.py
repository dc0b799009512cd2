"""The RFC 9470 API flow end to end: oidc-provider as the IdP of the real stack (Envoy,
stepup-authz, Valkey, the echo upstream), no dev IdP anywhere.

An API client with a password-only token gets the challenge, obtains a token with the
challenged acr from the OP (JWT access token for a resource, RFC 8707), and retries. The
same with the OP's default opaque access tokens, which the service introspects (RFC 7662)
at the endpoint the OP's discovery document names.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from authz.demo.stack import REPO_ROOT, Stack
from tests.interop.harness import CLIENT_ID, CLIENT_SECRET, RESOURCE, Browser, Op, running_op

pytestmark = [pytest.mark.interop, pytest.mark.e2e]


@pytest.fixture(scope="module")
def op_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Op, Stack]]:
    workdir: Path = tmp_path_factory.mktemp("op-stack")
    with running_op("jwt", workdir) as op:
        port = urlsplit(op.issuer).port
        assert port is not None
        stack = Stack(
            workdir / "stack",
            policy_file=REPO_ROOT / "examples" / "policy.yaml",
            with_idp=False,
            idp_port=port,  # the stack's issuer URL is the OP's
            extra_settings={
                "oidc": {
                    "client_secret": CLIENT_SECRET,
                    # The OP's opaque tokens carry no `aud`: introspected, and bound to our
                    # client instead (allowed_clients).
                    "introspection": {"require_audience": False, "timeout_ms": 200},
                    "allowed_clients": [CLIENT_ID],
                }
            },
        )
        assert stack.idp_url == op.issuer
        stack.start()
        try:
            yield op, stack
        finally:
            stack.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str, token: str) -> aiohttp.ClientResponse:
    resp = await http.get(url, headers={"Authorization": f"Bearer {token}"})
    await resp.read()
    return resp


async def test_rfc9470_challenge_then_a_stronger_token_from_the_op(
    op_stack: tuple[Op, Stack], http: aiohttp.ClientSession
) -> None:
    op, stack = op_stack
    idp = Browser(op, http)
    url = f"{stack.envoy_url}/accounts/123"

    weak = await idp.sign_in(factor="pwd", resource=RESOURCE)
    resp = await get(http, url, weak.access_token)
    assert resp.status == 401
    www = resp.headers["WWW-Authenticate"]
    assert 'error="insufficient_user_authentication"' in www
    acr_values = re.search(r'acr_values="([^"]+)"', www)
    max_age = re.search(r"max_age=(\d+)", www)
    assert acr_values and max_age
    assert resp.headers["x-stepup-reason"] == "acr-insufficient"

    # The client does what the challenge says, at the OP.
    strong = await idp.sign_in(
        acr_values=acr_values.group(1), max_age=int(max_age.group(1)), resource=RESOURCE
    )
    resp = await get(http, url, strong.access_token)
    assert resp.status == 200
    body = await resp.text()
    assert "x-stepup-acr" in body and "mfa" in body  # the echo upstream shows our headers


async def test_the_ops_default_opaque_tokens_are_introspected_by_the_check(
    op_stack: tuple[Op, Stack], http: aiohttp.ClientSession
) -> None:
    """Without `resource` this OP issues an opaque token (its default). The Check
    introspects it: a password-only one gets the RFC 9470 challenge, an mfa one is
    allowed, with the acr the OP's introspection answer carries."""
    op, stack = op_stack
    idp = Browser(op, http)
    url = f"{stack.envoy_url}/accounts/123"

    weak = await idp.sign_in(factor="pwd")
    assert "." not in weak.access_token
    resp = await get(http, url, weak.access_token)
    assert resp.status == 401, resp.headers
    assert resp.headers["x-stepup-reason"] == "acr-insufficient"
    assert 'error="insufficient_user_authentication"' in resp.headers["WWW-Authenticate"]

    strong = await idp.sign_in(acr_values="mfa")
    assert "." not in strong.access_token
    resp = await get(http, url, strong.access_token)
    assert resp.status == 200, resp.headers
    body = await resp.text()
    assert "x-stepup-acr" in body and "mfa" in body

    # Not a token the OP issued: inactive at introspection, never allowed.
    resp = await get(http, url, "not-a-token-the-op-issued-" + "x" * 20)
    assert resp.status == 401
    assert resp.headers["x-stepup-reason"] == "token-invalid"
