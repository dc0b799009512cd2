"""A grant only from a proven factor, only for the session that proved it -- through the
real Envoy, service, Valkey and dev IdP. Each test is one attack of docs/threat-model.md
and fails on a service that lets it through."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authz.admin.proofs import public_jwks, sign_proof
from authz.admin.proto.stepup.v1 import sessions_pb2 as pb
from authz.admin.proto.stepup.v1 import sessions_pb2_grpc
from authz.demo.stack import Stack
from tests.e2e.conftest import DEMO_POLICY
from tests.e2e.test_stepup_flow import password_token
from tests.tlsutil import pem

pytestmark = pytest.mark.e2e

PUSH_SECRET = "push-service-secret-0123456789"


@pytest.fixture(scope="module")
def gstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("grant-integrity")
    key = ec.generate_private_key(ec.SECP256R1())
    (d / "push.pem").write_bytes(pem(key))
    (d / "push.jwks").write_text(json.dumps(public_jwks(pem(key), "push-1")))
    (d / "push-secret").write_text(PUSH_SECRET)
    stack = Stack(d / "stack", policy_file=DEMO_POLICY)
    stack.extra_settings = {
        "api": {
            "enabled": True,
            "callers": [
                {
                    "name": "push",
                    "bearer_secret_file": str(d / "push-secret"),
                    "operations": ["record-grant"],
                    "max_level": "high",
                    "issuers": [stack.idp_url],
                    "acr": ["mfa"],
                    "amr": ["otp"],
                    "proof": {"issuer": "push", "jwks_file": str(d / "push.jwks")},
                }
            ],
        }
    }
    stack.key_dir = d  # type: ignore[attr-defined]
    with stack:
        yield stack


async def post(stack: Stack, path: str, token: str) -> tuple[int, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            stack.envoy_url + path,
            headers={"Authorization": f"Bearer {token}"},
            allow_redirects=False,
        ) as r,
    ):
        return r.status, dict(r.headers)


async def record_grant(stack: Stack, request: pb.RecordGrantRequest) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(stack.api_target) as channel:
        s = sessions_pb2_grpc.SessionsStub(channel)  # type: ignore[no-untyped-call]
        try:
            await s.RecordGrant(
                request, metadata=(("authorization", f"Bearer {PUSH_SECRET}"),), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


def claims_of(token: str) -> dict[str, Any]:
    out: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return out


async def test_the_api_is_not_on_the_ext_authz_port(gstack: Stack) -> None:
    """The ext_authz port serves Check and health only; neither port advertises services."""
    async with grpc.aio.insecure_channel(gstack.grpc_target) as channel:
        s = sessions_pb2_grpc.SessionsStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.ListSessions(pb.ListSessionsRequest(), timeout=10)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    for target in (gstack.grpc_target, gstack.api_target):
        async with grpc.aio.insecure_channel(target) as channel:
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            calls = refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in calls:
                    pass
            assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_a_password_token_reaches_wires_only_through_a_proven_factor(
    gstack: Stack,
) -> None:
    """The review's attack: with the API credential alone, a password-only token went from
    401 to 200 on POST /wires/1. Now the credential alone is refused and the route stays
    401; only the caller's signed proof of a verified factor opens it."""
    token = await password_token(gstack)
    c = claims_of(token)
    assert (await post(gstack, "/wires/1", token))[0] == 401
    asserted = pb.RecordGrantRequest(
        user=pb.User(issuer=c["iss"], subject=c["sub"]),
        session_id=c["sid"],
        level="high",
        acr="mfa",
        amr=["otp"],
    )
    assert await record_grant(gstack, asserted) is grpc.StatusCode.PERMISSION_DENIED
    assert (await post(gstack, "/wires/1", token))[0] == 401

    key_dir: Path = gstack.key_dir  # type: ignore[attr-defined]
    now = int(time.time())
    signed = sign_proof(
        (key_dir / "push.pem").read_bytes(),
        issuer="push",
        audience="stepup-authz-api",
        user_issuer=c["iss"],
        subject=c["sub"],
        session_id=c["sid"],
        level="high",
        acr="mfa",
        amr=["otp"],
        auth_time=now,
        kid="push-1",
        now=now,
    )
    proven = pb.RecordGrantRequest(
        user=pb.User(issuer=c["iss"], subject=c["sub"]),
        session_id=c["sid"],
        level="high",
        proof=signed,
    )
    assert await record_grant(gstack, proven) is grpc.StatusCode.OK
    status, headers = await post(gstack, "/wires/1", token)
    assert status == 200, headers
    # The same proof again: refused (single use), even for the same session.
    assert await record_grant(gstack, proven) is grpc.StatusCode.PERMISSION_DENIED
