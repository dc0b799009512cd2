"""The audit trail end to end (issue 3), through the real Envoy: the service writes the Redis
stream, the stack's exporter process archives it, and the real CLI verifies and exports it.

- exactly one record per authentication event under concurrent load (challenges, browser
  step-ups with TOTP, sensitive allows), matched by decision id and against /metrics;
- ``audit verify`` passes on the live archive and names the segment and line of an edited
  or deleted record in a copy;
- ``audit export`` (jsonl and csv) is sorted and complete for a window and a user;
- audit before access: with the audit Redis stopped (the session store up), an mfa token
  is refused with ``audit-unavailable``, never allowed, and the service recovers; with the
  one shared Redis stopped, nothing sensitive is allowed either.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from authz.audit.export import read_records
from authz.audit.segments import list_segments
from authz.demo.stack import Stack

from .conftest import make_stack
from .test_stepup_flow import Browser, api_get, password_token

pytestmark = pytest.mark.e2e

N_CHALLENGES = 40  # API requests with a password-only token on an elevated route
M_STEPUPS = 5  # browser round trips: sign in, step up with TOTP, read the page
K_ALLOWS = 20  # API requests with an acr=mfa token on the elevated route
ARCHIVE_WAIT_S = 20.0


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "stepup-authz"
    return [str(script)] if script.exists() else [sys.executable, "-m", "authz.cli"]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_cli(), "audit", *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def astack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A stack of its own: the window of the load test holds only this module's traffic.
    with make_stack(tmp_path_factory) as s:
        yield s


# -- helpers ----------------------------------------------------------------------------------


async def scrape(stack: Stack) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with aiohttp.ClientSession() as s, s.get(f"{stack.service_http_url}/metrics") as r:
        text = await r.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in metrics.items() if n == name and want <= lab)


def archived(stack: Stack) -> list[dict[str, Any]]:
    return read_records([stack.audit_dir]) if stack.audit_dir.is_dir() else []


def wait_for_records(stack: Stack, done: Any, what: str) -> list[dict[str, Any]]:
    """Poll the archive (bounded) until ``done(records)``; the exporter runs on its own."""
    deadline = time.monotonic() + ARCHIVE_WAIT_S
    while True:
        recs = archived(stack)
        if done(recs):
            return recs
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not archived within {ARCHIVE_WAIT_S:.0f}s\n"
                f"{stack.log_path('exporter').read_text()[-2000:]}"
            )
        time.sleep(0.1)


class StepupBrowser(Browser):
    async def step_up_from(self, start: str, path: str) -> None:
        """``Browser.step_up`` from a challenge already received (its decision id counted)."""
        status, headers, _ = await self.get(start)
        assert status == 302
        callback = await self.idp_login(headers["Location"], otp=True)
        status, headers, body = await self.get(callback)
        assert status == 303, body
        assert headers["Location"] == path


@dataclass
class LoadRun:
    """What the clients saw during the concurrent load, and the window it ran in."""

    since_ms: int
    until_ms: int = 0
    challenge_ids: list[str] = field(default_factory=list)  # 401/302 step-up responses
    allow_ids: list[str] = field(default_factory=list)  # 200s: the id the upstream saw
    stepups: int = 0  # completed browser round trips
    challenges_before: float = 0.0
    completions_before: float = 0.0
    challenges_after: float = 0.0
    completions_after: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)

    def in_window(self) -> list[dict[str, Any]]:
        return [r for r in self.records if self.since_ms <= r["ts_ms"] < self.until_ms]


async def _challenge(stack: Stack, token: str, i: int, run: LoadRun) -> None:
    status, headers, _ = await api_get(stack, f"/accounts/{i}", token)
    assert status == 401, (status, headers)
    assert 'error="insufficient_user_authentication"' in headers["WWW-Authenticate"]
    run.challenge_ids.append(headers["x-stepup-decision-id"])


async def _allow(stack: Stack, token: str, i: int, run: LoadRun) -> None:
    status, headers, body = await api_get(stack, f"/accounts/{1000 + i}", token)
    assert status == 200, (status, headers, body)
    run.allow_ids.append(json.loads(body)["headers"]["x-stepup-decision-id"])


async def _browser_stepup(stack: Stack, i: int, run: LoadRun) -> None:
    # A session (and cookie jar) per browser: a separate dev-IdP sign-in for each.
    path = f"/accounts/{2000 + i}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        b = StepupBrowser(s, stack)
        await b.sign_in(path)
        status, headers, _ = await b.get(path)  # the challenge the step-up answers
        assert status == 302 and headers["Location"].startswith("/_stepup/start?level=elevated")
        run.challenge_ids.append(headers["x-stepup-decision-id"])
        await b.step_up_from(headers["Location"], path)
        status, _, body = await b.get(path)
        assert status == 200, body
        run.allow_ids.append(json.loads(body)["headers"]["x-stepup-decision-id"])
        run.stepups += 1


async def _load(stack: Stack) -> LoadRun:
    pwd = await password_token(stack)
    mfa = await password_token(stack, otp=True)
    before = await scrape(stack)
    run = LoadRun(since_ms=int(time.time() * 1000) - 1)
    run.challenges_before = total(before, "stepup_authz_stepup_challenges_total", level="elevated")
    run.completions_before = total(
        before, "stepup_authz_stepup_completions_total", level="elevated", result="success"
    )
    await asyncio.gather(
        *(_challenge(stack, pwd, i, run) for i in range(N_CHALLENGES)),
        *(_browser_stepup(stack, i, run) for i in range(M_STEPUPS)),
        *(_allow(stack, mfa, i, run) for i in range(K_ALLOWS)),
    )
    run.until_ms = int(time.time() * 1000) + 1
    after = await scrape(stack)
    run.challenges_after = total(after, "stepup_authz_stepup_challenges_total", level="elevated")
    run.completions_after = total(
        after, "stepup_authz_stepup_completions_total", level="elevated", result="success"
    )
    return run


@pytest.fixture(scope="module")
def load_run(astack: Stack) -> LoadRun:
    run = asyncio.run(_load(astack))
    expected = set(run.challenge_ids) | set(run.allow_ids)

    def complete(recs: list[dict[str, Any]]) -> bool:
        have = {r.get("decision_id") for r in recs}
        done = sum(1 for r in recs if r["type"] == "stepup.completed")
        return expected <= have and done >= run.stepups

    wait_for_records(astack, complete, "the load test's records")
    astack.wait_audit_archived()
    run.records = archived(astack)
    return run


# -- exactly one record per authentication event -----------------------------------------------


def test_one_record_per_event_under_concurrent_load(load_run: LoadRun) -> None:
    run = load_run
    assert run.stepups == M_STEPUPS
    assert len(run.challenge_ids) == N_CHALLENGES + M_STEPUPS
    assert len(run.allow_ids) == K_ALLOWS + M_STEPUPS
    window = run.in_window()
    by_type = Counter(r["type"] for r in window)

    challenges = [r for r in window if r["type"] == "stepup.challenge"]
    assert sorted(r["decision_id"] for r in challenges) == sorted(run.challenge_ids)
    assert all(r["outcome"] == "step_up" and r["level"] == "elevated" for r in challenges)

    completed = [r for r in window if r["type"] == "stepup.completed"]
    assert [r["outcome"] for r in completed] == ["success"] * M_STEPUPS
    assert all(r["factor"] == "otp" and r["acr"] == "mfa" for r in completed)

    allowed = [r for r in window if r["type"] == "access.allowed"]
    assert sorted(r["decision_id"] for r in allowed) == sorted(run.allow_ids)
    # The mfa-token allows are proved by the token; the browsers' by their new grant.
    sources = Counter(r["evidence_source"] for r in allowed)
    assert sources == {"token": K_ALLOWS, "grant": M_STEPUPS}

    # Each browser's sign-in (its login redirect and its completion) and step-up start;
    # nothing else was audited.
    assert by_type == {
        "stepup.challenge": N_CHALLENGES + M_STEPUPS,
        "stepup.started": M_STEPUPS,
        "stepup.completed": M_STEPUPS,
        "access.allowed": K_ALLOWS + M_STEPUPS,
        "login.required": M_STEPUPS,
        "login.completed": M_STEPUPS,
    }

    # No duplicates anywhere in the archive: event ids, and decision ids per Check.
    event_ids = [r["event_id"] for r in run.records]
    assert len(event_ids) == len(set(event_ids))
    check_ids = [r["decision_id"] for r in run.records if r["decision_id"] is not None]
    assert len(check_ids) == len(set(check_ids))
    assert [r["seq"] for r in run.records] == list(range(1, len(run.records) + 1))

    # The service's own counters agree with the clients and the archive.
    assert run.challenges_after - run.challenges_before == N_CHALLENGES + M_STEPUPS
    assert run.completions_after - run.completions_before == M_STEPUPS


async def test_nothing_dropped_and_the_exporter_is_current(
    astack: Stack, load_run: LoadRun
) -> None:
    m = await scrape(astack)
    assert total(m, "stepup_authz_audit_dropped_total") == 0
    assert total(m, "stepup_authz_audit_events_total", sink="redis", result="error") == 0
    assert total(m, "stepup_authz_audit_events_total", sink="redis", result="ok") >= len(
        load_run.in_window()
    )
    async with aiohttp.ClientSession() as s, s.get(astack.exporter_metrics_url) as r:
        text = await r.text()
    exporter = {
        smp.name: smp.value
        for fam in text_string_to_metric_families(text)
        for smp in fam.samples
        if not smp.labels
    }
    assert exporter["stepup_authz_audit_lag_seconds"] == 0


# -- audit verify, the real CLI ----------------------------------------------------------------


def _segment_lines(archive: Path) -> tuple[Path, list[str]]:
    segs = list_segments([archive])
    assert segs, f"no segment in {archive}"
    return segs[0], segs[0].read_text().splitlines(keepends=True)


def _a_middle_event(lines: list[str]) -> int:
    """0-based index of an event line followed by another event line, past the first."""
    for i in range(1, len(lines) - 1):
        if '"kind":"event"' in lines[i] and '"kind":"event"' in lines[i + 1]:
            return i
    raise AssertionError("no two consecutive events in the first segment")


def _tampered_copy(src: Path, dst: Path) -> tuple[Path, list[str]]:
    shutil.copytree(src, dst)
    for p in dst.iterdir():  # sealed segments are read-only (0440)
        p.chmod(0o640)
    seg, lines = _segment_lines(dst)
    return seg, lines


def test_verify_passes_on_the_archive(astack: Stack, load_run: LoadRun) -> None:
    res = run_cli("verify", "--pubkey", astack.audit_public_key, astack.audit_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.rstrip().endswith("OK")
    res = run_cli("verify", "--json", "--pubkey", astack.audit_public_key, astack.audit_dir)
    report = json.loads(res.stdout)
    assert report["ok"] and report["signatures_checked"] and report["error"] is None
    assert report["records"] >= len(load_run.records)


def test_verify_names_the_segment_and_line_of_an_edited_record(
    astack: Stack, load_run: LoadRun, tmp_path: Path
) -> None:
    seg, lines = _tampered_copy(astack.audit_dir, tmp_path / "edited")
    i = _a_middle_event(lines)
    doc = json.loads(lines[i])
    original = lines[i]
    # One field, as an insider would: make the record say something it did not.
    lines[i] = original.replace(f'"outcome":"{doc["outcome"]}"', '"outcome":"deny"', 1)
    assert lines[i] != original
    seg.write_text("".join(lines))
    res = run_cli("verify", "--pubkey", astack.audit_public_key, seg.parent)
    assert res.returncode == 1, res.stdout
    assert (
        f"modified: {seg.name}:{i + 1} seq {doc['seq']} record {doc['event_id']}" in res.stdout
    ), res.stdout


def test_verify_names_the_segment_and_line_of_a_deleted_record(
    astack: Stack, load_run: LoadRun, tmp_path: Path
) -> None:
    seg, lines = _tampered_copy(astack.audit_dir, tmp_path / "deleted")
    i = _a_middle_event(lines)
    gone = json.loads(lines[i])
    del lines[i]
    seg.write_text("".join(lines))
    res = run_cli("verify", "--pubkey", astack.audit_public_key, seg.parent)
    assert res.returncode == 1, res.stdout
    # The record after the gap now sits on the deleted one's line.
    assert f"deleted: {seg.name}:{i + 1} seq {gone['seq'] + 1}" in res.stdout, res.stdout
    assert "1 record(s) missing" in res.stdout


# -- audit export, the real CLI ----------------------------------------------------------------


def _window_args(run: LoadRun) -> list[str]:
    return ["--since", str(run.since_ms), "--until", str(run.until_ms)]


def test_export_jsonl_and_csv_are_sorted_and_complete(
    astack: Stack, load_run: LoadRun, tmp_path: Path
) -> None:
    window = load_run.in_window()
    alice = {r["user"] for r in window if r["type"] == "stepup.completed"}
    assert len(alice) == 1
    user = alice.pop()
    expected = sorted(
        (r for r in window if r["user"] == user), key=lambda r: (r["ts_ms"], r["seq"])
    )
    assert len(expected) == len(window) - M_STEPUPS  # all but the anonymous login redirects

    res = run_cli(
        "export",
        *_window_args(load_run),
        "--user",
        user,
        "--format",
        "jsonl",
        "--pubkey",
        astack.audit_public_key,
        astack.audit_dir,
    )
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["event_id"] for r in got] == [r["event_id"] for r in expected]
    assert got == expected  # the archived records, hashes included
    assert f"{len(expected)} record(s)" in res.stderr

    out = tmp_path / "window.csv"
    res = run_cli(
        "export",
        *_window_args(load_run),
        "--user",
        user,
        "--format",
        "csv",
        "--output",
        out,
        astack.audit_dir,
    )
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text(), newline="")))
    assert [row["event_id"] for row in rows] == [r["event_id"] for r in expected]
    assert [int(row["seq"]) for row in rows] == [r["seq"] for r in expected]
    keys = [(int(row["ts_ms"]), int(row["seq"])) for row in rows]
    assert keys == sorted(keys)
    assert {row["type"] for row in rows} == {
        "stepup.challenge",
        "stepup.started",  # /_stepup/start sent the browser to the IdP
        "login.completed",  # its first sign-in at the callback
        "stepup.completed",
        "access.allowed",
    }

    # One type, the whole archive: exactly the step-up completions.
    res = run_cli("export", "--type", "stepup.completed", astack.audit_dir)
    assert len(res.stdout.splitlines()) == sum(
        1 for r in archived(astack) if r["type"] == "stepup.completed"
    )


# -- the exporter crashes -----------------------------------------------------------------------


async def test_exporter_killed_then_restarted_archives_each_record_once(
    astack: Stack, load_run: LoadRun
) -> None:
    pwd = await password_token(astack)
    await asyncio.to_thread(astack.stop_exporter, signal.SIGKILL)  # no final checkpoint
    ids = []
    for i in range(10):  # written to the stream while nothing archives it
        status, headers, _ = await api_get(astack, f"/accounts/{3000 + i}", pwd)
        assert status == 401
        ids.append(headers["x-stepup-decision-id"])
    await asyncio.to_thread(astack.start_exporter)

    def there(recs: list[dict[str, Any]]) -> bool:
        return set(ids) <= {r["decision_id"] for r in recs}

    recs = await asyncio.to_thread(wait_for_records, astack, there, "records after a crash")
    await asyncio.to_thread(astack.wait_audit_archived)
    assert sorted(r["decision_id"] for r in recs if r["decision_id"] in set(ids)) == sorted(ids)
    assert len({r["event_id"] for r in recs}) == len(recs)
    res = await asyncio.to_thread(
        run_cli, "verify", "--pubkey", astack.audit_public_key, astack.audit_dir
    )
    assert res.returncode == 0, res.stdout


# -- audit before access: the sink is down -----------------------------------------------------


@pytest.fixture(scope="module")
def split_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The audit stream on its own Valkey (audit.redis_url), as production should run it, so
    # the sink can be taken down while the session store stays up.
    with make_stack(tmp_path_factory, separate_audit_redis=True) as s:
        yield s


async def _recovered(stack: Stack, token: str) -> None:
    deadline = time.monotonic() + 15
    status = 0
    while time.monotonic() < deadline:
        status, _, _ = await api_get(stack, "/accounts/7", token)
        if status == 200:
            return
        assert status == 403, status  # never anything else while the service reconnects
        await asyncio.sleep(0.2)
    raise AssertionError(f"not allowed again after recovery (last status {status})")


async def test_audit_sink_down_mfa_token_denied_audit_unavailable_then_recovers(
    split_stack: Stack,
) -> None:
    stack = split_stack
    mfa = await password_token(stack, otp=True)
    assert (await api_get(stack, "/accounts/7", mfa))[0] == 200
    stack.stop_audit_redis()
    denied: list[str] = []
    try:
        for _ in range(5):
            status, headers, _ = await api_get(stack, "/accounts/7", mfa)
            # The session store is up: only the audit write failed, and the allow with it.
            assert (status, headers.get("x-stepup-reason")) == (403, "audit-unavailable")
            denied.append(headers["x-stepup-decision-id"])
    finally:
        stack.start_audit_redis()
    await _recovered(stack, mfa)

    # The denials were buffered while the sink was down and reach the archive after it: each
    # refused allow is on record as an error.fail_closed with the same decision id.
    def all_there(recs: list[dict[str, Any]]) -> bool:
        return set(denied) <= {r["decision_id"] for r in recs if r["type"] == "error.fail_closed"}

    recs = await asyncio.to_thread(
        wait_for_records, stack, all_there, "the audit-unavailable denials"
    )
    fails = [r for r in recs if r["decision_id"] in set(denied)]
    closed = {r["decision_id"]: r for r in fails if r["type"] == "error.fail_closed"}
    assert {r["reason"] for r in closed.values()} == {"audit-unavailable"}
    # A refused allow's record was MAC'd and numbered before the write failed, so it is
    # sent again and lands (once) too; always before the denial that supersedes it.
    for r in fails:
        if r["type"] == "access.allowed":
            assert r["seq"] < closed[r["decision_id"]]["seq"]
        else:
            assert r["type"] == "error.fail_closed"
    assert not any(r["type"] == "audit.quarantined" for r in recs)
    res = await asyncio.to_thread(
        run_cli, "verify", "--pubkey", stack.audit_public_key, stack.audit_dir
    )
    assert res.returncode == 0, res.stdout


async def test_redis_down_sensitive_requests_are_never_allowed_then_recover(
    astack: Stack, load_run: LoadRun
) -> None:
    # One Redis for sessions and audit (the demo's layout): whichever read or write fails
    # first names the reason, but an allow is never returned.
    mfa = await password_token(astack, otp=True)
    pwd = await password_token(astack)
    assert (await api_get(astack, "/accounts/7", mfa))[0] == 200
    astack.stop_redis()
    try:
        for _ in range(5):
            status, headers, _ = await api_get(astack, "/accounts/7", mfa)
            assert status == 403
            assert headers.get("x-stepup-reason") in {
                "audit-unavailable",
                "session-store-unavailable",
            }
            status, headers, _ = await api_get(astack, "/accounts/7", pwd)
            assert (status, headers.get("x-stepup-reason")) == (403, "session-store-unavailable")
    finally:
        astack.start_redis()
    await _recovered(astack, mfa)
    await asyncio.to_thread(astack.wait_audit_archived, ARCHIVE_WAIT_S)
    res = await asyncio.to_thread(
        run_cli, "verify", "--pubkey", astack.audit_public_key, astack.audit_dir
    )
    assert res.returncode == 0, res.stdout
