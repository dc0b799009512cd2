"""Who is at the step-up port: the one reading of a request's device and client address for
every step-up endpoint (the browser flow in ``endpoints.py``, the push flow in ``ciba``).

The client address is Envoy's, exactly as the Check gets it: the downstream remote address
Envoy computed (its ``xff_num_trusted_hops`` / original-IP detection), which the
``/_stepup/`` route sets in ``stepup.peer_header`` (``%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%``,
overwriting any client value). X-Forwarded-For is never read here either, so a grant bound
at the step-up and the Check that honours it compare the same address.
"""

from __future__ import annotations

from aiohttp import web

from authz.check.devices import DeviceResolver, xfcc_certificate
from authz.core.attributes import parse_ip


def client_address(request: web.Request, peer_header: str) -> str | None:
    """The client address Envoy set in ``peer_header``, normalised; None without one."""
    ip = parse_ip(request.headers.get(peer_header, ""))
    return str(ip) if ip is not None else None


async def presented(
    request: web.Request, now: int, *, peer_header: str, devices: DeviceResolver | None
) -> tuple[str | None, str | None]:
    """(device, client address) of the caller: its device identity as the Check reads it (a
    device cookie, an MDM assertion or, through Envoy's x-forwarded-client-cert, its
    certificate) and :func:`client_address`."""
    client = client_address(request, peer_header)
    if devices is None:
        return None, client
    headers = {k.lower(): v for k, v in request.headers.items()}
    device = await devices.resolve_headers(
        headers,
        now,
        peer_certificate=xfcc_certificate(headers.get("x-forwarded-client-cert", "")),
        client=client or "",
    )
    return (device.id if device is not None else None), client
