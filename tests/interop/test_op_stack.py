"""The RFC 9470 API flow end to end: oidc-provider as the IdP of the real stack (Envoy,
stepup-authz, Valkey, the echo upstream), no dev IdP anywhere.

An API client with a password-only token gets the challenge, obtains a token with the
challenged acr from the OP (JWT access token for a resource, RFC 8707), and retries.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from authz.demo.stack import REPO_ROOT, Stack
from tests.interop.harness import CLIENT_SECRET, RESOURCE, Browser, Op, running_op

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
            extra_settings={"oidc": {"client_secret": CLIENT_SECRET}},
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


async def test_opaque_token_of_the_default_flow_is_refused_until_introspection_is_wired(
    op_stack: tuple[Op, Stack], http: aiohttp.ClientSession
) -> None:
    """Without `resource` this OP issues an opaque token. The service, as deployed by the
    stack today, has no introspection wired into the Check: the token is refused (never
    allowed) as invalid. authz.check.introspection.build_access_tokens is the wiring."""
    op, stack = op_stack
    opaque = await Browser(op, http).sign_in(acr_values="mfa")
    assert "." not in opaque.access_token
    resp = await get(http, f"{stack.envoy_url}/accounts/123", opaque.access_token)
    assert resp.status == 401
    assert resp.headers["x-stepup-reason"] == "token-invalid"
