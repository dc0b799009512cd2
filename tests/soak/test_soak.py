"""Soak: the whole stack through real Envoy for ``SOAK_SECONDS`` (default 300) of mixed
traffic, with the session Redis restarted in the middle.

Expected safe outcomes, asserted at the end and printed as one summary line:
- zero fail-opens: no 200 on a sensitive route for a request without a valid grant (a token
  that never stepped up, no token at all, or the stepped-up session between the Redis restart,
  which loses its grant, and its next step-up);
- no unhandled exception in the service log (``Traceback``, ``check failed``);
- the service's RSS stays within its post-warm-up figure + ``SOAK_RSS_BOUND_MB`` (default 50);
- audit records lost = 0: every challenge a client saw (by decision id) is in the archive, and
  the archive holds as many challenge records as the service counted.

The audit stream has its own Redis (``separate_audit_redis``), as production should: the
restart takes the session store down and nothing else.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from authz.audit.export import read_records
from authz.demo.stack import REPO_ROOT, Stack
from tests.builders import idp_sign_in, password_token

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "300"))
RSS_BOUND_MB = float(os.environ.get("SOAK_RSS_BOUND_MB", "50"))
WORKERS = int(os.environ.get("SOAK_WORKERS", "8"))
# As long as it is asked to run, plus the stack's start, a Redis restart and the report.
pytestmark = [pytest.mark.soak, pytest.mark.timeout(SOAK_SECONDS + 600)]
SENSITIVE = "/accounts/7"
JSON = {"Accept": "application/json"}
HTML = {"Accept": "text/html"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(
        tmp_path_factory.mktemp("soak"),
        policy_file=REPO_ROOT / "examples" / "policy.yaml",
        separate_audit_redis=True,
    ) as s:
        yield s


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def step_up(stack: Stack, s: aiohttp.ClientSession) -> float:
    """The browser round trip through Envoy: app 302 -> start -> IdP (TOTP) -> callback.
    Returns when the callback was sent: the new grant cannot exist before then."""
    base = stack.envoy_url
    async with s.get(base + SENSITIVE, headers=HTML, allow_redirects=False) as r:
        assert r.status == 302, (r.status, dict(r.headers))
        start = r.headers["Location"]
    async with s.get(base + start, headers=HTML, allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        authorize = r.headers["Location"]
    cb = urlsplit(await idp_sign_in(s, authorize, headers=HTML))
    sent = time.monotonic()
    async with s.get(f"{base}{cb.path}?{cb.query}", headers=HTML, allow_redirects=False) as r:
        assert r.status == 303, await r.text()
    return sent


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    fail_opens: list[str] = field(default_factory=list)
    challenge_ids: set[str] = field(default_factory=set)
    errors: Counter[str] = field(default_factory=Counter)
    # The stepped-up session's grant is valid outside [lost_at, regranted_at).
    lost_at: float | None = None
    regranted_at: float | None = None

    def grant_absent(self, sent_at: float, answered_at: float) -> bool:
        """Certainly no grant while this request was decided: sent after the server holding
        the old grant had exited, answered before the new step-up's callback was sent.
        (Requests in flight across either edge may legitimately go either way.)"""
        if self.lost_at is None or sent_at < self.lost_at:
            return False
        return self.regranted_at is None or answered_at < self.regranted_at


async def worker(
    stack: Stack,
    i: int,
    until: float,
    tally: Tally,
    alice: aiohttp.ClientSession,
    anon: aiohttp.ClientSession,
    bob_token: str,
) -> None:
    base = stack.envoy_url
    kinds = ("grant", "no-grant", "no-token", "public")
    n = i
    while time.monotonic() < until:
        kind = kinds[n % len(kinds)]
        n += 1
        sent_at = time.monotonic()
        try:
            if kind == "grant":
                resp = await alice.get(base + SENSITIVE, headers=JSON, allow_redirects=False)
            elif kind == "no-grant":
                resp = await anon.get(
                    base + SENSITIVE,
                    allow_redirects=False,
                    headers={**JSON, "Authorization": f"Bearer {bob_token}"},
                )
            elif kind == "no-token":
                resp = await anon.get(base + SENSITIVE, headers=JSON, allow_redirects=False)
            else:
                resp = await anon.get(base + "/public/info", headers=JSON, allow_redirects=False)
            async with resp:
                await resp.read()
                status, headers = resp.status, resp.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.errors[type(exc).__name__] += 1
            await asyncio.sleep(0.01)
            continue
        tally.sent[kind] += 1
        tally.statuses[(kind, status)] += 1
        if status == 200 and kind in ("no-grant", "no-token"):
            tally.fail_opens.append(f"{kind} at {sent_at:.3f}")
        answered_at = time.monotonic()
        if status == 200 and kind == "grant" and tally.grant_absent(sent_at, answered_at):
            tally.fail_opens.append(
                f"grant lost at {tally.lost_at:.3f}, allowed: sent "
                f"{sent_at:.3f}, answered {answered_at:.3f}"
            )
        if status == 401 and "insufficient_user_authentication" in headers.get(
            "WWW-Authenticate", ""
        ):
            tally.challenge_ids.add(headers["x-stepup-decision-id"])


async def scrape(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out[smp.name] = out.get(smp.name, 0.0) + smp.value
    return out


async def test_soak(stack: Stack) -> None:
    pid = stack.pid("service")
    assert pid is not None
    alice_token, bob_token = (
        await password_token(stack.idp_url, "alice"),
        await password_token(stack.idp_url, "bob"),
    )
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP-address host
    jar.update_cookies({"stepup-token": alice_token}, URL(stack.envoy_url))
    tally = Tally()
    async with (
        aiohttp.ClientSession(cookie_jar=jar, connector=aiohttp.TCPConnector(limit=64)) as alice,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as anon,
    ):
        await step_up(stack, alice)
        started = time.monotonic()
        until = started + SOAK_SECONDS
        workers = [
            asyncio.ensure_future(worker(stack, i, until, tally, alice, anon, bob_token))
            for i in range(WORKERS)
        ]
        warm = min(10.0, SOAK_SECONDS / 6)
        await asyncio.sleep(warm)
        rss_start = rss_kb(pid)
        rss_samples = [rss_start]
        restart_at = started + SOAK_SECONDS / 2
        restarted = False
        while time.monotonic() < until:
            await asyncio.sleep(1.0)
            rss_samples.append(rss_kb(pid))
            if not restarted and time.monotonic() >= restart_at:
                restarted = True
                await asyncio.to_thread(stack.stop_redis)
                # From here the grant is gone (no persistence): the server has exited, so
                # no request sent later can be answered from the old data.
                tally.lost_at = time.monotonic()
                await asyncio.sleep(2.0)
                await asyncio.to_thread(stack.start_redis)
                t0 = time.monotonic()
                while True:  # the service reconnects by itself; then step up again
                    try:
                        callback_sent = await step_up(stack, alice)
                        break
                    except AssertionError:
                        assert time.monotonic() - t0 < 30, "no step-up 30 s after the restart"
                        await asyncio.sleep(0.2)
                tally.regranted_at = callback_sent
                recovery = time.monotonic() - t0
        await asyncio.gather(*workers)
    rss_end = rss_kb(pid)
    await asyncio.to_thread(stack.wait_audit_archived, 30.0)
    metrics = await scrape(f"{stack.service_http_url}/metrics")
    records = read_records([stack.audit_dir])
    archived_challenges = {r["decision_id"] for r in records if r["type"] == "stepup.challenge"}
    lost = len(tally.challenge_ids - archived_challenges)
    counted = metrics.get("stepup_authz_stepup_challenges_total", 0)
    log = stack.log_path("service").read_text(errors="replace")
    tracebacks = log.count("Traceback") + log.count("check failed")
    peak = max(rss_samples)
    total = sum(tally.sent.values())
    print(
        f"\nSOAK seconds={SOAK_SECONDS:.0f} requests={total} rps={total / SOAK_SECONDS:.0f} "
        f"by_kind={dict(tally.sent)} statuses={dict(sorted(tally.statuses.items()))} "
        f"fail_opens={len(tally.fail_opens)} client_errors={dict(tally.errors)} "
        f"redis_restart_recovery_s={recovery:.2f} tracebacks={tracebacks} "
        f"rss_start_mb={rss_start / 1024:.1f} rss_peak_mb={peak / 1024:.1f} "
        f"rss_end_mb={rss_end / 1024:.1f} rss_bound_mb={rss_start / 1024 + RSS_BOUND_MB:.1f} "
        f"challenges_seen={len(tally.challenge_ids)} challenges_counted={counted:.0f} "
        f"challenges_archived={len(archived_challenges)} audit_records_lost={lost} "
        f"audit_dropped={metrics.get('stepup_authz_audit_dropped_total', 0):.0f}"
    )
    assert restarted
    assert tally.fail_opens == [], tally.fail_opens[:10]
    assert tracebacks == 0, log[-3000:]
    assert peak <= rss_start + RSS_BOUND_MB * 1024
    assert lost == 0
    assert len(archived_challenges) == counted
    assert metrics.get("stepup_authz_audit_dropped_total", 0) == 0
    assert tally.statuses[("grant", 200)] > 0 and tally.statuses[("public", 200)] > 0
