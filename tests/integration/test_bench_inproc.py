"""bench.micro's and bench.growth's in-process check path is the service's own: in HTTP
mode the listener's connection protocol (framing, parsing, the Task per check, the answer
written, keep-alive and close) over an in-memory transport; in gRPC mode the servicer.
Real Redis and the dev IdP; only the socket is missing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import jwt
import pytest

from bench import inproc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


async def test_the_in_process_paths_are_the_listener_and_the_servicer(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    async with inproc.local_environment(tmp_path, redis_url=redis_url) as lv:
        config = lv.write_settings(
            REPO / "examples" / "policy.yaml", redis={"key_prefix": redis_prefix}
        )
        settings = inproc.in_process_settings(config)
        service = await inproc.start(settings)
        try:
            token = await asyncio.to_thread(inproc.password_token, settings)
            http = inproc.HttpPath(service.authorizer, settings)
            grpc = inproc.GrpcPath(service.authorizer, settings)
            head = inproc.http_check_head(token)
            request = inproc.grpc_check_request(token)
            # a password token without a grant: step-up, in both modes
            assert await http.once(head) == 401
            assert await grpc.once(request) == 403
            claims = jwt.decode(token, options={"verify_signature": False})
            await inproc.write_grant(service.authorizer.store, claims, "elevated", 3600)
            assert await asyncio.gather(*(http.once(head) for _ in range(4))) == [200] * 4
            assert await grpc.once(request) == 200
            # one keep-alive connection per check in flight, each counted by the listener
            assert len(http.server.conns) == 4
            # a head the listener refuses (a header sent twice) is denied and closes its
            # connection, which is not used again
            refused = head.replace(b"\r\n\r\n", b"\r\nx-twice: 1\r\nx-twice: 2\r\n\r\n", 1)
            assert await http.once(refused) == 403
            assert len(http.server.conns) == 3
            assert await http.once(head) == 200
        finally:
            await service.stop()
