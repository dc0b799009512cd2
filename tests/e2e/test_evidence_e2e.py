"""The evidence pack end to end: a scripted journey through the real Envoy, the dev IdP,
the service and the audit exporter produces an archive; ``stepup-authz evidence`` makes a
pack of it; every figure equals the count taken directly from the archive's records;
``evidence verify`` passes and fails after any file changes; the HTML, opened in Debian's
Chromium, has no console error and renders every chart (a screenshot goes to the folder
``STEPUP_SCREENSHOTS`` names: docs/img refreshes the docs); ``audit incident`` lists a
user's and a session's decisions.

The journey: API challenges (password tokens), browser step-ups with TOTP, allows with
mfa tokens, a rule denial, a shadow rule firing on every request, a rejected token, an
API grant, a refused API grant and a revocation by the Sessions API caller, a policy
reload (SIGHUP), and fail-closed denials while the session Redis is down.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pypdf import PdfReader

from authz.admin.proofs import public_jwks, sign_proof
from authz.audit.export import read_records
from authz.audit.segments import list_segments
from authz.demo.stack import Stack
from tests.tlsutil import pem

from .conftest import DEMO_POLICY
from .test_stepup_flow import Browser, api_get, password_token

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
# STEPUP_SCREENSHOTS=docs/img refreshes the docs' screenshot; else a scratch folder (a test run
# does not rewrite tracked files).
SCREENSHOT = (
    Path(os.environ.get("STEPUP_SCREENSHOTS") or tempfile.mkdtemp(prefix="evidence-shots-"))
    / "evidence-report.png"
)
API_SECRET = "evidence-e2e-api-secret-0123"
N_CHALLENGES, M_STEPUPS, K_ALLOWS, F_FAIL_CLOSED = 12, 3, 6, 4
ARCHIVE_WAIT_S = 20.0
RULES = """
rules:
  - {name: blocked-range, when: {ip_in: [198.51.100.0/24]}, deny: ip-blocked}
  - {name: loopback-wires, when: {ip_in: [127.0.0.0/8], level_at_least: high}, deny: wires-blocked}
  - {name: offsite, when: {ip_not_in: [10.0.0.0/8]}, raise_to: high, mode: shadow}
"""


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "stepup-authz"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "authz.cli"]
    return subprocess.run(
        [*argv, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def policy_text(version: str) -> str:
    base = DEMO_POLICY.read_text().split("\nrules:")[0]
    return base.replace("version: demo-1", f"version: {version}") + RULES


@dataclass
class Journey:
    stack: Stack
    since_ms: int
    until_ms: int = 0
    policy_v1: Path = Path()
    decision_ids: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    user: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)

    def window(self) -> list[dict[str, Any]]:
        return [r for r in self.records if self.since_ms <= r["ts_ms"] < self.until_ms]


@pytest.fixture(scope="module")
def estack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("evidence")
    (d / "policy.yaml").write_text(policy_text("ev-1"))
    (d / "api-secret").write_text(API_SECRET)
    key = ec.generate_private_key(ec.SECP256R1())
    (d / "ops.pem").write_bytes(pem(key))
    (d / "ops.jwks").write_text(json.dumps(public_jwks(pem(key), "ops-1")))
    stack = Stack(
        d / "stack",
        policy_file=d / "policy.yaml",
        separate_audit_redis=True,  # the session Redis can go down while the trail is written
        # Latency is not the subject here: on 2 shared cores a 50 ms store deadline can pass
        # and fail a step-up closed; the fail-closed records of the journey are made on
        # purpose below.
        authz_timeout="1s",
    )
    stack.extra_settings = {
        "api": {
            "enabled": True,
            "callers": [
                {
                    "name": "ops",
                    "bearer_secret_file": str(d / "api-secret"),
                    "operations": ["record-grant", "revoke"],
                    "max_level": "elevated",
                    "issuers": [stack.idp_url],
                    "acr": ["mfa"],
                    "amr": ["otp", "pwd"],
                    "proof": {"issuer": "ops", "jwks_file": str(d / "ops.jwks")},
                }
            ],
        },
        "redis": {"deadline_ms": 400},
    }
    with stack:
        yield stack


async def _browser_stepup(stack: Stack, i: int, j: Journey) -> None:
    path = f"/accounts/{500 + i}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        b = Browser(s, stack)
        await b.sign_in(path)
        await b.step_up(path)
        status, _, body = await b.get(path)
        assert status == 200, body
        j.decision_ids.append(json.loads(body)["headers"]["x-stepup-decision-id"])


def _proof(stack: Stack, token: str, acr: str) -> Path:
    """A grant proof signed with the ops caller's key (what its factor service would send)."""
    claims = jwt.decode(token, options={"verify_signature": False})
    now = int(time.time())
    signed = sign_proof(
        (stack.workdir.parent / "ops.pem").read_bytes(),
        issuer="ops",
        audience="stepup-authz-api",
        user_issuer=claims["iss"],
        subject=claims["sub"],
        session_id="api-s",
        level="elevated",
        acr=acr,
        amr=["otp"],
        auth_time=now,
        kid="ops-1",
        now=now,
    )
    path = stack.workdir / f"proof-{acr}.jwt"
    path.write_text(signed)
    return path


async def _sessions_api(stack: Stack, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    claims = jwt.decode(token, options={"verify_signature": False})
    secret = stack.workdir / "api-secret"
    secret.write_text(API_SECRET)
    return await asyncio.to_thread(
        cli,
        "sessions",
        *args,
        "--target",
        stack.api_target,
        "--user",
        claims["iss"],
        claims["sub"],
        "--token-file",
        secret,
    )


async def _journey(stack: Stack) -> Journey:
    j = Journey(stack, since_ms=int(time.time() * 1000) - 1)
    pwd = await password_token(stack)
    mfa = await password_token(stack, otp=True)
    j.user = f"{stack.idp_url}|{jwt.decode(pwd, options={'verify_signature': False})['sub']}"
    for i in range(N_CHALLENGES):
        status, headers, _ = await api_get(stack, f"/accounts/{i}", pwd)
        assert status == 401
        j.decision_ids.append(headers["x-stepup-decision-id"])
    for i in range(M_STEPUPS):
        await _browser_stepup(stack, i, j)
    for i in range(K_ALLOWS):
        status, headers, body = await api_get(stack, f"/accounts/{100 + i}", mfa)
        assert status == 200, body
        j.decision_ids.append(json.loads(body)["headers"]["x-stepup-decision-id"])
    status, headers, _ = await api_get(stack, "/wires/1", mfa)
    assert (status, headers["x-stepup-reason"]) == (403, "wires-blocked")
    j.decision_ids.append(headers["x-stepup-decision-id"])
    status, headers, _ = await api_get(stack, "/accounts/1", "not-a-token")
    assert status == 401
    j.decision_ids.append(headers["x-stepup-decision-id"])
    # the Sessions API: a grant, a grant refused (acr too weak), a revocation
    ok = await _sessions_api(
        stack,
        pwd,
        "grant",
        "--session",
        "api-s",
        "--level",
        "elevated",
        "--proof-file",
        str(_proof(stack, pwd, "mfa")),
    )
    assert ok.returncode == 0, ok.stderr
    refused = await _sessions_api(  # acr pwd: beyond what the caller may assert
        stack,
        pwd,
        "grant",
        "--session",
        "api-s",
        "--level",
        "elevated",
        "--proof-file",
        str(_proof(stack, pwd, "pwd")),
    )
    assert refused.returncode != 0
    revoked = await _sessions_api(stack, pwd, "revoke", "--session", "api-s", "--reason", "e2e")
    assert revoked.returncode == 0, revoked.stderr
    # a policy change, reloaded now (SIGHUP) rather than at the next poll
    j.policy_v1 = stack.workdir / "policy-ev-1.yaml"
    shutil.copy(stack.policy_file, j.policy_v1)
    stack.policy_file.write_text(policy_text("ev-2"))
    proc = stack.service_proc
    assert proc is not None
    proc.send_signal(signal.SIGHUP)
    # fail closed: the session store is down, the audit Redis is up
    stack.stop_redis()
    try:
        for i in range(F_FAIL_CLOSED):
            status, headers, _ = await api_get(stack, f"/accounts/{200 + i}", pwd)
            assert (status, headers["x-stepup-reason"]) == (403, "session-store-unavailable")
            j.decision_ids.append(headers["x-stepup-decision-id"])
    finally:
        stack.start_redis()
    return j


def _archived(stack: Stack) -> list[dict[str, Any]]:
    return read_records([stack.audit_dir]) if stack.audit_dir.is_dir() else []


@pytest.fixture(scope="module")
def journey(estack: Stack) -> Journey:
    j = asyncio.run(_journey(estack))

    def done(recs: list[dict[str, Any]]) -> bool:
        ids = {r.get("decision_id") for r in recs}
        types = Counter(r["type"] for r in recs)
        return (
            set(j.decision_ids) <= ids
            and types["policy.reload"] >= 1
            and types["grant.revoked"] >= 1
            and types["stepup.completed"] >= M_STEPUPS + 2
        )

    deadline = time.monotonic() + ARCHIVE_WAIT_S  # the exporter archives on its own clock
    while not done(recs := _archived(estack)):
        assert time.monotonic() < deadline, estack.log_path("exporter").read_text()[-2000:]
        time.sleep(0.1)
    estack.wait_audit_archived()
    j.until_ms = int(time.time() * 1000) + 1
    j.records = _archived(estack)
    j.sessions = sorted(
        {r["session"] for r in recs if r["type"] == "stepup.completed" and r.get("via") != "api"}
    )
    return j


def _period(j: Journey) -> list[str]:
    return ["--since", str(j.since_ms), "--until", str(j.until_ms)]


@pytest.fixture(scope="module")
def pack(journey: Journey, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    s = journey.stack
    out = tmp_path_factory.mktemp("pack") / "pack"
    res = cli(
        "evidence",
        "--archive",
        s.audit_dir,
        *_period(journey),
        "--out",
        out,
        "--signing-key",
        s.audit_signing_key,
        "--policy",
        journey.policy_v1,
        "--policy",
        s.policy_file,
        "--security-report",
        ROOT / "docs" / "security-tests.md",
        "--envoy-admin",
        s.admin_url,
        "--config",
        s.workdir / "config.yaml",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return out, res.stdout


def test_the_journey_is_in_the_archive(journey: Journey) -> None:
    types = Counter(r["type"] for r in journey.window())
    assert types["stepup.challenge"] == N_CHALLENGES + M_STEPUPS
    assert types["error.fail_closed"] == F_FAIL_CLOSED
    assert types["access.denied"] == 1 and types["token.rejected"] == 1
    assert types["policy.reload"] == 1 and types["grant.revoked"] == 1


def test_the_packs_figures_equal_the_archives_counts(
    journey: Journey, pack: tuple[Path, str]
) -> None:
    facts = json.loads((pack[0] / "evidence.json").read_text())
    w = journey.window()

    def count(pred: Any, key: Any) -> Counter[Any]:
        return Counter(key(r) for r in w if pred(r))

    assert facts["event_types"] == dict(Counter(r["type"] for r in w))
    assert facts["summary"]["records"] == len(w)
    completed = [r for r in w if r["type"] == "stepup.completed" and r.get("via") != "api"]
    assert facts["summary"]["stepups_succeeded"] == M_STEPUPS == len(completed)
    assert facts["stepups"]["challenges_by_level"] == dict(
        count(lambda r: r["type"] == "stepup.challenge", lambda r: r["level"])
    )
    assert {
        (x["level"], x["factor"], x["outcome"]): x["count"]
        for x in facts["stepups"]["by_level_factor_outcome"]
    } == Counter((r["level"], r["factor"], r["outcome"]) for r in completed)
    assert {(x["type"], x["reason"]): x["count"] for x in facts["failures"]["by_type_reason"]} == (
        count(
            lambda r: r["outcome"] in ("failure", "deny", "error"),
            lambda r: (r["type"], r["reason"]),
        )
    )
    assert facts["fail_closed"]["total"] == F_FAIL_CLOSED
    assert sum(i["count"] for i in facts["fail_closed"]["intervals"]) == F_FAIL_CLOSED
    assert facts["fail_closed"]["by_reason"] == {"session-store-unavailable": F_FAIL_CLOSED}
    assert facts["sensitive_access"]["by_level"] == dict(
        count(lambda r: r["type"] == "access.allowed", lambda r: r["level"])
    )
    assert facts["sensitive_access"]["total"] == K_ALLOWS + M_STEPUPS
    api = facts["api"]
    assert (
        {(x["caller"], x["outcome"]): x["count"] for x in api["grants_by_caller"]}
        == count(
            lambda r: r["type"] == "stepup.completed" and r.get("via") == "api",
            lambda r: (r["actor"], r["outcome"]),
        )
        == {("ops", "success"): 1, ("ops", "failure"): 1}
    )
    assert api["revocations_by_caller"] == [{"caller": "ops", "records": 1, "revoked": 1}]
    assert facts["logouts"]["total"] == sum(1 for r in w if r["type"].split(".")[0] == "logout")
    fired = Counter(n for r in w if r.get("shadow") for n in r["shadow"].split(","))
    assert fired["offsite"] > 0
    assert {x["name"]: x["fired"] for x in facts["shadow"]["rules"]} == dict(fired)
    pol = facts["policies"]
    assert [r["version"] for r in pol["reloads"]] == ["ev-2"]
    assert {f["version"]: f["tied_by"] for f in pol["files"]} == {
        "ev-1": "decisions (version)",
        "ev-2": "reload record (sha256)",
    }
    assert facts["integrity"]["verified"] and facts["integrity"]["verify"]["signatures_checked"]
    assert facts["coverage"]["ok"] and facts["coverage"]["uncovered"] == 0
    assert facts["security_suite"]["total_cases"] > 0


def test_evidence_verify_passes_and_fails_after_any_file_changes(
    journey: Journey, pack: tuple[Path, str], tmp_path: Path
) -> None:
    out, _ = pack
    pub = journey.stack.audit_public_key
    res = cli("evidence", "verify", out, "--pubkey", pub)
    assert res.returncode == 0 and "OK: pack signed by key" in res.stdout, res.stdout
    for name in ("evidence.json", "report.html", "report.pdf", "manifest.json"):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        data = bytearray((copy / name).read_bytes())
        data[-10] ^= 0x20
        (copy / name).write_bytes(bytes(data))
        res = cli("evidence", "verify", copy, "--pubkey", pub)
        assert res.returncode == 1 and f"FAILED: {name}" in res.stdout, (name, res.stdout)


def test_the_pdf_has_the_figures(pack: tuple[Path, str]) -> None:
    out, stdout = pack
    reader = PdfReader(out / "report.pdf")
    pages = len(reader.pages)
    assert f"report.pdf {pages} pages" in stdout and pages >= 3
    first = reader.pages[0].extract_text()
    assert "The archive verifies" in first and "signatures checked" in first
    text = "".join(p.extract_text() for p in reader.pages)
    for needed in ("offsite", "session-store-unavailable", "wires-blocked", "ops", "ev-2"):
        assert needed in text, needed


def test_a_broken_archive_is_refused_and_allowed_only_with_a_warning(
    journey: Journey, tmp_path: Path
) -> None:
    s = journey.stack
    broken = tmp_path / "archive"
    shutil.copytree(s.audit_dir, broken, ignore=shutil.ignore_patterns(".lock"))
    seg = list_segments([broken])[0]
    seg.chmod(0o640)
    seg.write_bytes(seg.read_bytes().replace(b'"outcome":"step_up"', b'"outcome":"allow"', 1))
    args = [
        "evidence",
        "--archive",
        broken,
        *_period(journey),
        "--signing-key",
        s.audit_signing_key,
    ]
    res = cli(*args, "--out", tmp_path / "refused")
    assert res.returncode == 1 and "refused: the archive does not verify: modified" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "refused").exists()
    res = cli(*args, "--out", tmp_path / "allowed", "--allow-unverified")
    assert res.returncode == 0 and "UNVERIFIED" in res.stdout
    first = PdfReader(tmp_path / "allowed" / "report.pdf").pages[0].extract_text()
    assert "UNVERIFIED" in first
    res = cli(
        "evidence",
        "--archive",
        s.audit_dir,
        "--out",
        tmp_path / "x",
        "--signing-key",
        s.audit_signing_key,
    )
    assert res.returncode == 2 and "the period is required" in res.stderr


def test_audit_incident_lists_a_users_and_a_sessions_decisions(journey: Journey) -> None:
    s = journey.stack
    w = journey.window()
    res = cli(
        "audit",
        "incident",
        "--user",
        journey.user,
        *_period(journey),
        "--format",
        "jsonl",
        "--pubkey",
        s.audit_public_key,
        s.audit_dir,
    )
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    mine = [r for r in w if r["user"] == journey.user]
    assert [r["seq"] for r in rows] == [
        r["seq"] for r in sorted(mine, key=lambda r: (r["ts_ms"], r["seq"]))
    ]
    assert {"route", "level", "outcome", "device", "client_ip", "time_utc"} <= rows[0].keys()
    assert f"audit incident: {len(mine)} records" in res.stderr
    session = journey.sessions[0]
    res = cli("audit", "incident", "--session", session, *_period(journey), s.audit_dir)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == sum(1 for r in w if r["session"] == session) and lines
    assert any(" access.allowed " in ln and "/accounts/50" in ln for ln in lines)


async def test_the_report_renders_in_chromium_with_every_chart(pack: tuple[Path, str]) -> None:
    from tests.browser import chromium

    out, _ = pack
    facts = json.loads((out / "evidence.json").read_text())
    problems: list[str] = []
    async with chromium() as browser:
        ctx = await browser.new_context(viewport={"width": 1100, "height": 900})
        page = await ctx.new_page()
        page.on(
            "console",
            lambda m: (
                problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
            ),
        )
        page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
        page.on(
            "request",
            lambda r: (
                problems.append(f"request: {r.url}") if not r.url.startswith("file:") else None
            ),
        )
        await page.goto((out / "report.html").as_uri())
        charts = await page.eval_on_selector_all(
            "svg.chart",
            """els => els.map(e => {
                 const b = e.getBoundingClientRect();
                 return {id: e.dataset.chart, points: +e.dataset.points,
                         bars: e.querySelectorAll('.bar').length,
                         drawn: [...e.querySelectorAll('.bar')].filter(r => {
                           const q = r.getBoundingClientRect(); return q.width > 0 && q.height > 0;
                         }).length,
                         w: b.width, h: b.height};
               })""",
        )
        banner = await page.inner_text(".banner")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert problems == []
    assert "The archive verifies" in banner
    assert [c["id"] for c in charts] == [
        "stepups-per-bucket",
        "stepups-by-factor",
        "failures-by-reason",
        "fail-closed-timeline",
        "sensitive-by-level",
        "event-types",
    ]
    for c in charts:
        assert c["w"] > 0 and c["h"] > 0, c
        assert c["points"] > 0 and c["bars"] == c["drawn"] == c["points"], c
    by_id = {c["id"]: c for c in charts}
    assert by_id["event-types"]["points"] == len(facts["event_types"])
    assert by_id["fail-closed-timeline"]["points"] == len(facts["fail_closed"]["intervals"])
    assert SCREENSHOT.stat().st_size > 10_000
