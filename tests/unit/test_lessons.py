"""What an allow teaches (note_allow) is written only when the state the Check read does not
already hold it: first access to a level, a new IP, place or device, another session of
the same user, or a sighting older than the refresh interval. Judged from the read alone
(no process memory), so a fresh authorizer (another replica) skips as well. Clocks are
injected; the store is the in-memory one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from authz.check.authorizer import _LESSON_REFRESH_S, Authorizer
from authz.check.request import PEER_HEADER, attributes_from_check
from authz.config.policy_file import PolicyHolder
from authz.core.decision import Outcome
from authz.core.session import Sighting, device_tag, session_key, user_key
from authz.core.signals import Device, Geo
from authz.ops.metrics import Metrics
from authz.store.memory import MemorySessionStore
from authz.store.sessions import decode_sighting, encode_sighting
from tests.builders import ISSUER, NOW, FakeClock, FakeTokens, check_request, identity

POLICY = """\
levels:
  public: {public: true}
  standard: {}
  other: {}
routes:
  - {path: /, level: public}
  - {path: /other, level: other}
default_level: standard
signals:
  impossible_travel: {max_kmh: 1000}
"""

PLACES = {"192.0.2.1": (48.86, 2.35), "192.0.2.2": (48.86, 2.35), "203.0.113.9": (35.68, 139.69)}


class Places:
    """GeoIP: Paris for 192.0.2.1/.2, Tokyo for 203.0.113.9."""

    def __init__(self) -> None:
        self.moved: dict[str, tuple[float, float]] = {}

    def lookup(self, ip: Any) -> Geo | None:
        where = self.moved.get(str(ip)) or PLACES.get(str(ip))
        return None if where is None else Geo("XX", where[0], where[1])


class Devices:
    """The device a test names in ``x-test-device`` (none without it)."""

    async def resolve(self, attrs: Any, now: int) -> Device | None:
        name = attrs.headers.get("x-test-device")
        return None if name is None else Device(name, "cookie")


class Counting(MemorySessionStore):
    def __init__(self, now: FakeClock) -> None:
        super().__init__(now)
        self.lessons: list[dict[str, Any]] = []

    async def note_allow(self, **kw: Any) -> None:
        self.lessons.append(kw)
        await super().note_allow(**kw)


class Env:
    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "policy.yaml").write_text(POLICY)
        self.path = tmp_path / "policy.yaml"
        self.clock = FakeClock(NOW)
        self.store = Counting(self.clock)
        self.tokens = FakeTokens()
        self.tokens.access["a"] = identity(sid="A")
        self.tokens.access["b"] = identity(sid="B")
        self.places = Places()
        self.authorizer = self.replica()

    def replica(self) -> Authorizer:
        """An authorizer on the same store (another process, another replica)."""
        return Authorizer(
            policy=PolicyHolder(self.path),
            tokens=self.tokens,
            store=self.store,
            metrics=Metrics(),
            token_cookie="stepup_token",
            leeway=0,
            clock=self.clock,
            geoip=self.places,  # type: ignore[arg-type]
            devices=Devices(),  # type: ignore[arg-type]
        )

    async def check(
        self,
        token: str = "a",  # noqa: S107 (a test bearer name)
        ip: str = "192.0.2.1",
        path: str = "/accounts/1",
        authorizer: Authorizer | None = None,
        device: str | None = None,
    ) -> Any:
        headers = {"authorization": f"Bearer {token}", PEER_HEADER: ip}
        if device is not None:
            headers["x-test-device"] = device
        attrs = attributes_from_check(check_request(path, headers))
        az = authorizer or self.authorizer
        result = await az.check(attrs)
        await az.drain()
        assert result.decision.outcome is Outcome.ALLOW, result.decision.reason
        return result.decision

    def sessions(self) -> dict[str, int]:
        u = self.store._users[user_key(ISSUER, "alice")]
        return {sk: s.last_seen for sk, s in u.sessions.items()}


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


SK_A = session_key(ISSUER, "alice", "A")
SK_B = session_key(ISSUER, "alice", "B")


async def test_a_repeat_within_the_interval_is_not_written_on_any_replica(env: Env) -> None:
    await env.check()
    assert len(env.store.lessons) == 1  # the first Check: level, sighting, session
    env.clock.advance(_LESSON_REFRESH_S - 1)
    await env.check()
    await env.check(authorizer=env.replica())  # no process memory involved
    assert len(env.store.lessons) == 1
    env.clock.advance(1)  # the sighting is now as old as the interval: refreshed
    await env.check()
    assert len(env.store.lessons) == 2
    assert env.sessions()[SK_A] == NOW + _LESSON_REFRESH_S


async def test_first_access_to_a_level_is_written_on_its_first_check(env: Env) -> None:
    await env.check()
    await env.check(path="/other")
    assert [x["level"] for x in env.store.lessons] == ["standard", "other"]
    await env.check(path="/other")
    assert len(env.store.lessons) == 2


async def test_a_new_ip_or_place_is_written_on_its_first_check(env: Env) -> None:
    await env.check()
    await env.check(ip="192.0.2.2")  # same place, new IP
    assert [x["ip"] for x in env.store.lessons] == ["192.0.2.1", "192.0.2.2"]
    env.places.moved["192.0.2.2"] = (45.76, 4.84)  # the same IP, now placed elsewhere
    await env.check(ip="192.0.2.2")
    assert len(env.store.lessons) == 3 and env.store.lessons[-1]["lat"] == 45.76
    await env.check(ip="192.0.2.2")
    assert len(env.store.lessons) == 3


async def test_a_new_device_is_written_on_its_first_check(env: Env) -> None:
    await env.check()
    await env.check(device="d1")
    await env.check(device="d1")
    await env.check(device="d2")
    assert len(env.store.lessons) == 3
    assert env.store.lessons[-1]["device"] is not None


async def test_a_second_sessions_index_entry_stays_fresh_while_the_first_is_active(
    env: Env,
) -> None:
    """One sighting per user, one index entry per session: session A checked every few
    seconds must not keep B's lesson from being written (B's entry would go stale and be
    the one the sessions bound evicts)."""
    await env.check("a")
    await env.check("b")
    for _ in range(10):
        env.clock.advance(10)
        await env.check("a")
        await env.check("b")
    seen = env.sessions()
    assert seen[SK_A] == seen[SK_B] == NOW + 100
    last = env.store._users[user_key(ISSUER, "alice")].sighting
    assert last is not None and last[0].session == SK_B


async def test_impossible_travel_fires_right_after_a_skipped_lesson(env: Env) -> None:
    await env.check()
    env.clock.advance(30)
    await env.check()  # not written: the sighting is 30 s old
    assert len(env.store.lessons) == 1
    env.clock.advance(5)
    far = await env.check(ip="203.0.113.9")  # Tokyo, 35 s after Paris
    assert "impossible-travel" in far.signals
    assert len(env.store.lessons) == 2  # and the new place is written


async def test_a_sighting_from_the_clock_ahead_or_without_a_session_is_rewritten(
    env: Env,
) -> None:
    u = env.store._user(user_key(ISSUER, "alice"), NOW)
    await env.check()
    assert len(env.store.lessons) == 1
    u.sighting = (Sighting(NOW + 5, "192.0.2.1", 48.86, 2.35, SK_A, None), NOW + 86_400)
    await env.check()  # written by a replica whose clock is ahead: not trusted as fresh
    u.sighting = (Sighting(NOW, "192.0.2.1", 48.86, 2.35), NOW + 86_400)
    await env.check()  # the earlier format names no session
    assert len(env.store.lessons) == 3


def test_sighting_format_round_trips_and_the_earlier_one_still_reads() -> None:
    s = Sighting(NOW, "2001:db8::1", 48.86, 2.35, SK_A, device_tag("spiffe://x/a,b c"))
    text = encode_sighting(s)
    assert decode_sighting(text) == s
    assert text.count(",") == 3  # what the previous release splits into four fields
    none = Sighting(NOW, "192.0.2.1", None, None, SK_A, None)
    assert decode_sighting(encode_sighting(none)) == none
    assert decode_sighting(f"{NOW},192.0.2.1,1.5,2.5") == Sighting(NOW, "192.0.2.1", 1.5, 2.5)
    assert decode_sighting(f"{NOW},192.0.2.1 {SK_A},1.5,2.5") is None  # half a tail
    assert decode_sighting(f"{NOW},192.0.2.1  -,1.5,2.5") is None
