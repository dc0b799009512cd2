"""One task per process that polls the IdP for the push step-ups this process started.

Not a task per request: a heap of (when the next poll is due, request id), one loop that
sleeps until the earliest, and at most ``max_inflight`` polls at a time, each in its own
short task so a slow IdP answer never holds the others back. A request leaves the heap when
it ends (approved, denied, expired, failed) or when its record is gone; nothing outlives
the request's expiry, and ``max_pending`` bounds what one process holds.

The status endpoint polls too (a request started on another replica, or a replica that
restarted): the store's lease keeps the two from asking the IdP at once, and the record's
``next_poll_at`` keeps both within the IdP's ``interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import time
from collections.abc import Awaitable, Callable

from authz.stepup.ciba.request import CibaRequest

log = logging.getLogger("authz.stepup.ciba")

Poll = Callable[[str], Awaitable[tuple[CibaRequest | None, bool]]]
# How long to wait before trying again after the store failed (the record is unreadable).
RETRY_S = 2


class CibaPoller:
    def __init__(
        self,
        poll: Poll,
        *,
        max_pending: int,
        max_inflight: int,
        max_expiry_s: int,
        clock: Callable[[], float] = time.time,
        wait: Callable[[asyncio.Event, float | None], Awaitable[None]] | None = None,
    ) -> None:
        self._poll = poll
        self._max_pending = max_pending
        self._max_expiry_s = max_expiry_s
        self.clock = clock
        self._wait = wait or _wait_event
        self._heap: list[tuple[int, str, int]] = []  # (due, request id, give up at)
        self._owned: set[str] = set()  # scheduled or being polled
        self._inflight: set[asyncio.Task[None]] = set()
        self._sem = asyncio.Semaphore(max_inflight)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._owned)

    def has_room(self) -> bool:
        return len(self._owned) < self._max_pending

    def add(self, request_id: str, due: int) -> bool:
        """Poll ``request_id`` from ``due`` on; False when this process holds too many."""
        if request_id in self._owned:
            return True
        if not self.has_room():
            log.warning("CIBA poller full: the request is polled only when its client asks")
            return False
        self._owned.add(request_id)
        give_up = math.ceil(self.clock()) + self._max_expiry_s + RETRY_S
        heapq.heappush(self._heap, (due, request_id, give_up))
        self._wake.set()
        return True

    def run_due(self, now: float) -> int | None:
        """Start a poll for every request due at ``now``; the next due time, if any."""
        while self._heap and self._heap[0][0] <= now:
            _, request_id, give_up = heapq.heappop(self._heap)
            task = asyncio.get_running_loop().create_task(self._poll_one(request_id, give_up))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        return self._heap[0][0] if self._heap else None

    async def _poll_one(self, request_id: str, give_up: int) -> None:
        async with self._sem:
            try:
                record, polled = await self._poll(request_id)
            except Exception as exc:  # a store or IdP failure must not end the loop
                log.warning("CIBA poll failed", extra={"error": f"{type(exc).__name__}: {exc}"})
                now = math.ceil(self.clock())
                if now + RETRY_S < give_up:
                    heapq.heappush(self._heap, (now + RETRY_S, request_id, give_up))
                    self._wake.set()
                else:
                    self._owned.discard(request_id)
                return
        if record is None or record.ended:
            self._owned.discard(request_id)
            return
        now = math.ceil(self.clock())
        due = record.next_poll_at if polled else max(record.next_poll_at, now + 1)
        # At the latest when it expires, so the expiry is noticed and recorded.
        due = min(due, max(record.expires_at, now + 1))
        heapq.heappush(self._heap, (due, request_id, give_up))
        self._wake.set()

    async def drain(self) -> None:
        """Wait for the polls now in flight (tests)."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight))

    async def run(self) -> None:
        while True:
            self._wake.clear()
            nxt = self.run_due(self.clock())
            await self._wait(self._wake, None if nxt is None else max(0.0, nxt - self.clock()))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def aclose(self) -> None:
        tasks = [t for t in (self._task, *self._inflight) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None


async def _wait_event(event: asyncio.Event, seconds: float | None) -> None:
    """Until ``event`` is set or ``seconds`` have passed (None: until set)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
