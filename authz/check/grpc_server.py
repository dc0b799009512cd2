"""The gRPC listeners: ext_authz v3 Authorization/Check (and the Sessions API on its own
port), health checking, reflection only when enabled.

Shutdown follows grpc's graceful-shutdown example: health goes NOT_SERVING first (so Envoy
and Kubernetes stop sending new checks), then ``server.stop(grace)`` lets in-flight checks
finish before the listener closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authz.admin.config import ApiTls
from authz.check.authorizer import Authorizer
from authz.check.request import PEER_HEADER, attributes_from_check
from authz.check.response import ResponseBuilder
from authz.config.settings import GrpcSettings, TlsSettings
from authz.core.decision import failed, refused
from authz.core.reasons import Reason
from authz.errors import RequestError

log = logging.getLogger("authz.grpc")
SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name


# The generated grpc base class is untyped (xds-protos ships no .pyi for _grpc modules).
class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self,
        authorizer: Authorizer,
        responses: ResponseBuilder,
        peer_header: str | None = PEER_HEADER,
    ) -> None:
        self.authorizer = authorizer
        self.responses = responses
        # Where Envoy puts the client address it computed (grpc.peer_header); None: Envoy's
        # connection peer, attributes.source.address (authz/check/request.py).
        self.peer_header = peer_header.lower() if peer_header is not None else None

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        try:
            attrs = attributes_from_check(request, self.peer_header)
        except RequestError as exc:
            answer = self.authorizer.unread(refused(exc.reason))
            return self.responses.build(answer.decision, None, answer.decision_id)
        except Exception:
            log.exception("unreadable CheckRequest")
            answer = self.authorizer.unread(failed(Reason.INTERNAL_ERROR))
            return self.responses.build(answer.decision, None, answer.decision_id)
        # Envoy's deadline for this call (its ext_authz timeout): a Check that waited past it
        # is shed as overloaded before any Redis call (Authorizer.check).
        remaining = context.time_remaining() if context is not None else None
        deadline = self.authorizer.deadline_in(remaining)
        result = await self.authorizer.check(attrs, deadline)
        return self.responses.build(result.decision, attrs, result.decision_id)


def _credentials(tls: TlsSettings | ApiTls | None) -> grpc.ServerCredentials | None:
    if tls is None:
        return None
    key = tls.key_file.read_bytes()
    cert = tls.cert_file.read_bytes()
    ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


Register = Callable[[grpc.aio.Server], None]


class GrpcServer:
    """One gRPC listener with health checking (and reflection only when enabled): the
    ext_authz port (``GrpcServer.for_ext_authz``) and the Sessions API's own port."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        services: Sequence[tuple[str, Register]],
        tls: TlsSettings | ApiTls | None = None,
        reflection_on: bool = False,
        shutdown_delay_s: float = 1.0,
        shutdown_grace_s: float = 5.0,
        max_concurrent_rpcs: int | None = None,
    ) -> None:
        """``services``: (service name, register function) served on this port."""
        self.shutdown_delay_s = shutdown_delay_s
        self.shutdown_grace_s = shutdown_grace_s
        self.names = tuple(name for name, _ in services)
        self.server = grpc.aio.server(
            maximum_concurrent_rpcs=max_concurrent_rpcs,
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", 1 << 20),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ],
        )
        for _, register in services:
            register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if reflection_on:  # off by default: it advertises every service on the port
            reflection.enable_server_reflection(
                (*self.names, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
            )
        address = f"{host}:{port}"
        creds = _credentials(tls)
        if creds is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, creds)

    @classmethod
    def for_ext_authz(cls, settings: GrpcSettings, servicer: AuthorizationServicer) -> GrpcServer:
        def register(server: grpc.aio.Server) -> None:
            external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)

        return cls(
            host=settings.host,
            port=settings.port,
            services=[(SERVICE_NAME, register)],
            tls=settings.tls,
            reflection_on=settings.reflection,
            shutdown_delay_s=settings.shutdown_delay_s,
            shutdown_grace_s=settings.shutdown_grace_s,
            max_concurrent_rpcs=settings.max_concurrent_rpcs,
        )

    async def start(self) -> None:
        await self.server.start()
        for name in ("", *self.names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING
        await asyncio.sleep(self.shutdown_delay_s)
        await self.server.stop(self.shutdown_grace_s)
