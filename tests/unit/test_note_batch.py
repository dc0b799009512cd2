"""note_allow over a client with ``execute_at`` (FastRedis): the lessons queued in one
event-loop pass go out as one script call (note_allow_batch.lua, at most 64 lessons a call);
a lone lesson is note_allow.lua itself; a failed call fails every lesson in it (StoreError),
never leaves one waiting. Against Redis: tests/integration/test_fastredis_live.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from authz.errors import StoreError
from authz.store.sessions import _NOTE_ALLOW, _NOTE_ALLOW_BATCH, RedisSessionStore


class Scripts:
    """Records each call; answers like Redis would (or raises ``fail``)."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail

    async def execute_at(self, when: float, *args: Any) -> Any:
        self.calls.append(args)
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        return 1


def store(scripts: Scripts) -> RedisSessionStore:
    return RedisSessionStore(object(), prefix="t:", deadline_ms=50, script_client=scripts)


def lesson(i: int) -> dict[str, Any]:
    return dict(
        user=f"u{i}", session=f"s{i}", level="elevated", ip=f"192.0.2.{i % 250}",
        device=None, now=1000,
    )  # fmt: skip


async def test_lessons_of_one_pass_are_one_call() -> None:
    scripts = Scripts()
    s = store(scripts)
    await asyncio.gather(*(s.note_allow(**lesson(i)) for i in range(5)))
    assert len(scripts.calls) == 1
    cmd, sha, numkeys, *rest = scripts.calls[0]
    assert (cmd, sha, numkeys) == ("EVALSHA", _NOTE_ALLOW_BATCH.sha, 25)
    assert len(rest) == 25 + 5 * 13
    assert rest[:5] == [f"t:u:{{u0}}:{k}" for k in ("lv", "ls", "ss", "dv", "ip")]


async def test_a_lone_lesson_is_note_allow_itself() -> None:
    scripts = Scripts()
    await store(scripts).note_allow(**lesson(0))
    assert [(c[0], c[1], c[2]) for c in scripts.calls] == [("EVALSHA", _NOTE_ALLOW.sha, 5)]


async def test_a_pass_of_many_lessons_is_cut_into_calls_of_64() -> None:
    scripts = Scripts()
    s = store(scripts)
    await asyncio.gather(*(s.note_allow(**lesson(i)) for i in range(70)))
    assert sorted(c[2] for c in scripts.calls) == [6 * 5, 64 * 5]


async def test_a_failed_call_fails_each_of_its_lessons() -> None:
    scripts = Scripts(fail=RedisConnectionError("down"))
    s = store(scripts)
    results = await asyncio.gather(
        *(s.note_allow(**lesson(i)) for i in range(3)), return_exceptions=True
    )
    assert len(scripts.calls) == 1
    assert all(isinstance(r, StoreError) for r in results), results


async def test_a_cancelled_batch_still_answers_its_lessons() -> None:
    sent = asyncio.Event()

    class Hang(Scripts):
        async def execute_at(self, when: float, *args: Any) -> Any:
            self.calls.append(args)
            sent.set()
            await asyncio.Event().wait()

    scripts = Hang()
    s = store(scripts)
    waiting = [asyncio.ensure_future(s.note_allow(**lesson(i))) for i in range(2)]
    await sent.wait()
    for task in asyncio.all_tasks():
        if task.get_coro().__qualname__.endswith("_write_notes"):  # type: ignore[union-attr]
            task.cancel()
    for w in waiting:
        with pytest.raises(StoreError, match="not written"):
            await w
