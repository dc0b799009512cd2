"""The push step-up endpoints on the step-up port, for API clients (``add_routes``).

=================================  ============================================================
``POST <prefix>/ciba``             start: ``Authorization: Bearer <token>``, a JSON body naming
                                   the level (``level``, or the challenge's ``acr_values`` and
                                   ``max_age``) and the action (``method``, ``path``) ->
                                   ``202`` with the request's ``id``, ``binding_message``,
                                   ``interval``, ``expires_in`` and ``Location``
``GET  <prefix>/ciba/<id>``        its outcome, for the session that started it only:
                                   ``pending`` (``Retry-After``), ``approved``, ``denied``,
                                   ``expired``, ``failed`` (with ``reason``)
=================================  ============================================================

The token travels only as a bearer header, never a cookie: a cross-site page cannot make a
browser start pushes. Every refusal is JSON ``{"error", "reason", "reference"}`` with the
reference also in the log line, the metric and (once the caller is known) the audit record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from aiohttp import web

from authz.check.devices import DeviceResolver
from authz.core.attributes import normalize_host
from authz.core.reasons import Reason
from authz.errors import RequestError
from authz.stepup.ciba.flow import CibaFlow, CibaRefused
from authz.stepup.ciba.request import CibaRequest, StartError, Status, read_start
from authz.stepup.presented import presented

MAX_BODY = 4096
_OAUTH_ERROR = {400: "invalid_request", 401: "invalid_token", 404: "not_found", 429: "slow_down"}


def _json(
    status: int, doc: dict[str, object], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(doc, separators=(",", ":")),
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def _refused(exc: CibaRefused) -> web.Response:
    headers: dict[str, str] = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="stepup-authz"' + (
            "" if exc.reason == Reason.NO_CREDENTIALS else ', error="invalid_token"'
        )
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    error = _OAUTH_ERROR.get(exc.status, "unavailable" if exc.status >= 500 else "refused")
    body: dict[str, object] = {"error": error, "reason": str(exc.reason), "detail": exc.detail}
    if exc.reference:
        body["reference"] = exc.reference
    return _json(exc.status, body, headers)


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() != "bearer ":
        return None
    return auth[7:].strip() or None


class CibaRoutes:
    def __init__(
        self,
        flow: CibaFlow,
        *,
        path_prefix: str,
        peer_header: str,
        devices: DeviceResolver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.flow = flow
        self.prefix = path_prefix
        self.peer_header = peer_header
        self.devices = devices
        self.clock = clock

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(f"{self.prefix}/ciba", self.start)
        app.router.add_get(f"{self.prefix}/ciba/{{request_id}}", self.status)

    def status_url(self, request_id: str) -> str:
        return f"{self.prefix}/ciba/{request_id}"

    async def start(self, request: web.Request) -> web.Response:
        now = int(self.clock())
        try:
            caller = await self.flow.identify(_bearer(request), now)
            if request.content_type != "application/json":
                raise self.flow.bad_start(caller, Reason.BAD_REQUEST, "send a JSON body")
            if request.content_length is None or request.content_length > MAX_BODY:
                raise self.flow.bad_start(
                    caller, Reason.BAD_REQUEST, f"a body of at most {MAX_BODY} bytes"
                )
            raw = await request.read()
            try:
                start = read_start(json.loads(raw))
                host = normalize_host(request.host)
            except StartError as exc:
                raise self.flow.bad_start(caller, exc.reason, exc.detail) from None
            except RequestError as exc:
                raise self.flow.bad_start(caller, exc.reason, "the Host is not valid") from None
            except ValueError:
                raise self.flow.bad_start(
                    caller, Reason.BAD_REQUEST, "the body is not valid JSON"
                ) from None
            device, ip = await presented(
                request, now, peer_header=self.peer_header, devices=self.devices
            )
            started = await self.flow.start(caller, start, host=host, device=device, ip=ip)
        except CibaRefused as exc:
            return _refused(exc)
        record = started.request
        url = self.status_url(started.request_id)
        return _json(
            202,
            {
                "id": started.request_id,
                "status": Status.PENDING.value,
                "level": record.level,
                "binding_message": record.binding_message,
                "interval": record.interval,
                "expires_in": max(0, record.expires_at - now),
                "status_url": url,
            },
            {"Location": url, "Retry-After": str(record.interval)},
        )

    async def status(self, request: web.Request) -> web.Response:
        now = int(self.clock())
        try:
            caller = await self.flow.identify(_bearer(request), now)
            record = await self.flow.status(request.match_info["request_id"], caller)
        except CibaRefused as exc:
            return _refused(exc)
        return _json(200, *self._outcome(record, int(self.clock())))

    def _outcome(self, record: CibaRequest, now: int) -> tuple[dict[str, object], dict[str, str]]:
        doc: dict[str, object] = {"status": record.status.value, "level": record.level}
        headers: dict[str, str] = {}
        if record.status is Status.PENDING:
            wait = max(1, record.next_poll_at - now)
            doc.update(interval=record.interval, expires_in=max(0, record.expires_at - now))
            headers["Retry-After"] = str(min(wait, record.interval))
        else:
            doc["reason"] = record.reason
        if record.grant_expires_at is not None:
            doc["grant_expires_in"] = max(0, record.grant_expires_at - now)
        return doc, headers
