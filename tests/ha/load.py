"""A Check load that tells apart requests with a valid grant from requests without one, and
keeps the timeline of outcomes, for failover and fault tests."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from tests.ha.harness import Env


@dataclass
class Sample:
    at: float  # monotonic
    granted: bool  # the token's session holds a valid grant for the route
    allowed: bool
    reason: str | None
    status: int


@dataclass
class Load:
    env: Env
    path: str
    granted_token: str
    ungranted_token: str
    workers: int = 6
    samples: list[Sample] = field(default_factory=list)
    transport_errors: Counter[str] = field(default_factory=Counter)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _worker(self, i: int) -> None:
        granted = i % 2 == 0
        token = self.granted_token if granted else self.ungranted_token
        while not self._stop.is_set():
            try:
                r = await self.env.check(self.path, token, timeout=2.0)
            except Exception as exc:  # a gRPC failure is Envoy's deny, never an allow
                self.transport_errors[type(exc).__name__] += 1
                await asyncio.sleep(0.01)
                continue
            self.samples.append(Sample(time.monotonic(), granted, r.allowed, r.reason, r.status))
            await asyncio.sleep(0.002)

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._worker(i)) for i in range(self.workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def wait_recovered(
        self,
        since: float,
        timeout: float,  # noqa: ASYNC109
        streak: int = 20,
    ) -> float:
        """Seconds from ``since`` until ``streak`` consecutive granted requests were allowed
        (the first of them marks recovery); AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run, first = 0, None
            for s in self.samples:
                if s.at < since or not s.granted:
                    continue
                if s.allowed:
                    run += 1
                    first = first if first is not None else s.at
                    if run >= streak:
                        return first - since
                else:
                    run, first = 0, None
            await asyncio.sleep(0.05)
        raise AssertionError(f"not recovered within {timeout}s: {self.summary()}")

    async def granted_since(
        self,
        since: float,
        n: int,
        timeout: float,  # noqa: ASYNC109
    ) -> list[Sample]:
        """The granted requests answered after ``since``, once there are ``n`` of them (however
        long a failover stalls the Check); AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            after = [s for s in self.samples if s.granted and s.at > since]
            if len(after) >= n:
                return after
            await asyncio.sleep(0.05)
        raise AssertionError(f"fewer than {n} granted requests in {timeout}s: {self.summary()}")

    @property
    def allowed_without_grant(self) -> int:
        return sum(1 for s in self.samples if s.allowed and not s.granted)

    def reasons(self, granted: bool) -> Counter[str]:
        return Counter(
            str(s.reason) for s in self.samples if s.granted == granted and not s.allowed
        )

    def outage(self) -> tuple[int, float]:
        """(failed granted requests, seconds from the first to the last of them)."""
        bad = [s.at for s in self.samples if s.granted and not s.allowed]
        return len(bad), (bad[-1] - bad[0]) if bad else 0.0

    def summary(self) -> str:
        n_bad, window = self.outage()
        return (
            f"requests={len(self.samples)} allowed_without_grant="
            f"{self.allowed_without_grant} granted_denied={n_bad} "
            f"outage_window={window:.3f}s granted_reasons={dict(self.reasons(True))} "
            f"ungranted_reasons={dict(self.reasons(False))} "
            f"transport_errors={dict(self.transport_errors)}"
        )
