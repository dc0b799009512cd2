"""The identity provider as the service needs it at start: its discovery document and its
token verification keys, loaded in the background until both are in.

An IdP that is down, hangs or answers 404 while the service starts must not stop the
service: it starts degraded. ``/readyz`` says "keys: FAIL" until both are loaded (the
load balancer sends it nothing meanwhile); a Check that needs a token is refused with
``keys-unavailable`` and a step-up with ``idp-unavailable``, each with its log line. Loads
are retried with exponential backoff (``oidc.start_retry_initial_s`` doubling up to
``oidc.start_retry_max_s``, with jitter so replicas do not retry in step), one warning
per failed attempt naming what failed; one line says when the IdP is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp

from authz.check.jwks import KeySource
from authz.errors import StepupError
from authz.ops.degraded import Backoff
from authz.stepup.oidc import ProviderMetadata, discover

log = logging.getLogger("authz.idp")


class IdpConnection:
    """Discovery then the keys; ``start()`` tries once and, if that fails, keeps trying in
    the background. ``on_ready`` callbacks run once, with the metadata, when both are in."""

    def __init__(
        self,
        *,
        issuer: str,
        http: aiohttp.ClientSession,
        timeout_s: float,
        keys: KeySource,
        backoff: Backoff,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.issuer = issuer
        self._http = http
        self._timeout_s = timeout_s
        self.keys = keys
        self._backoff = backoff
        self._sleep = sleep
        self.metadata: ProviderMetadata | None = None
        self._keys_started = False
        self._announced = False  # discovery and keys both in, callbacks run
        self._ready_callbacks: list[Callable[[ProviderMetadata], None]] = []
        self._task: asyncio.Task[None] | None = None
        self.attempts = 0
        self.last_error = "not tried yet"

    @property
    def ready(self) -> bool:
        """Discovery done and verification keys loaded: what ``/readyz`` reports."""
        return self._announced and self.keys.ready

    def on_ready(self, callback: Callable[[ProviderMetadata], None]) -> None:
        self._ready_callbacks.append(callback)

    async def start(self) -> None:
        """One attempt now; on failure a warning and the retries go on in the background."""
        if await self._attempt(first=True):
            return
        log.warning(
            "the identity provider is not reachable: starting degraded; step-ups and Checks "
            "that need a token are refused until it answers",
            extra={"issuer": self.issuer, "error": self.last_error},
        )
        self._task = asyncio.create_task(self._retry())

    async def _attempt(self, *, first: bool = False) -> bool:
        """One try; True once both are in. The callbacks' errors (a setting this IdP
        cannot serve) stop the start on the ``first`` attempt and are logged after it."""
        self.attempts += 1
        try:
            if self.metadata is None:
                self.metadata = await discover(self.issuer, self._http, self._timeout_s)
            if not self._keys_started:
                await self.keys.start()
                self._keys_started = True
        except StepupError as exc:  # OidcError, KeysUnavailable: each names what failed
            self.last_error = str(exc)
            return False
        except Exception as exc:  # anything else is the same: not ready, try again later
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        metadata = self.metadata
        assert metadata is not None
        if not self._announced:
            self._announced = True
            for callback in self._ready_callbacks:
                try:
                    callback(metadata)
                except Exception as exc:
                    if first:
                        raise
                    log.error(
                        "the identity provider answered, but a part cannot work with it",
                        extra={"issuer": self.issuer, "error": f"{type(exc).__name__}: {exc}"},
                    )
        return True

    async def _retry(self) -> None:
        for delay in self._backoff.delays():
            await self._sleep(delay)
            if await self._attempt():
                log.info(
                    "the identity provider answered: keys loaded, ready",
                    extra={"issuer": self.issuer, "attempts": self.attempts},
                )
                return
            log.warning(
                "the identity provider is still not reachable",
                extra={
                    "issuer": self.issuer,
                    "error": self.last_error,
                    "attempts": self.attempts,
                },
            )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
