"""Starting degraded: what the service depends on may be briefly unreachable at start.

``Backoff`` is the retry schedule for the identity provider (``authz.stepup.provider``)
and for the session store here: the store is not needed to start (its client connects on
first use) but a store that does not answer at start is worth a warning, so that "serving"
is not the only line an operator sees while every step-up answers 503; one more line says
when it answers. The requests refused meanwhile log their own line (reason, decision id).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger("authz.degraded")

START_PING_TIMEOUT_S = 1.0  # the first connection may take longer than a Check's deadline


@dataclass(frozen=True, slots=True)
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.2  # each delay is moved by up to this fraction, either way

    def delays(self, rand: Callable[[], float] = random.random) -> Iterator[float]:
        delay = self.initial_s
        while True:
            yield delay * (1 + self.jitter * (2 * rand() - 1))
            delay = min(self.max_s, delay * 2)


async def _answers(ping: Callable[[], Awaitable[object]], timeout_s: float) -> str | None:
    """None when ``ping`` answers within ``timeout_s``, else why not."""
    try:
        async with asyncio.timeout(timeout_s):
            await ping()
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class StoreWatch:
    """``start()`` pings once; if the store does not answer it warns and pings again with
    ``backoff`` in the background until it does (then says so). ``aclose()`` stops it."""

    def __init__(
        self,
        ping: Callable[[], Awaitable[object]],
        *,
        what: str,
        backoff: Backoff,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        timeout_s: float = START_PING_TIMEOUT_S,
    ) -> None:
        self._ping = ping
        self._what = what
        self._backoff = backoff
        self._sleep = sleep
        self._timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None
        self.answered = False

    async def start(self) -> None:
        why = await _answers(self._ping, self._timeout_s)
        if why is None:
            self.answered = True
            return
        log.warning(
            "the session store is not reachable: starting degraded; step-ups and Checks "
            "that need a session are refused until it answers",
            extra={"store": self._what, "error": why},
        )
        self._task = asyncio.create_task(self._retry())

    async def _retry(self) -> None:
        attempts = 1
        for delay in self._backoff.delays():
            await self._sleep(delay)
            attempts += 1
            if await _answers(self._ping, self._timeout_s) is None:
                self.answered = True
                log.info(
                    "the session store answered", extra={"store": self._what, "attempts": attempts}
                )
                return

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
