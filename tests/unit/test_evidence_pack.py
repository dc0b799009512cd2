"""The evidence pack from a generated archive: every figure against records whose counts
are known, refusal of a broken archive, the signed manifest, pseudonyms, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pypdf import PdfReader

from authz.audit.archive import ArchiveWriter
from authz.audit.chain import SigningKey
from authz.audit.segments import list_segments
from authz.cli import main as cli_main
from authz.config.policy_file import read_policy
from authz.evidence.facts import Period, Pseudonyms, build_facts, fail_closed_intervals
from authz.evidence.inputs import InputError, read_security_report
from authz.evidence.manifest import MANIFEST, PACK_FILES, verify_pack
from authz.evidence.pack import PackError, PackOptions, PackRefused, make_pack
from authz.evidence.reading import read_archive

ROOT = Path(__file__).resolve().parents[2]
KEY = SigningKey.generate()
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY = 86_400_000
ALICE = "https://idp.example|alice"
BOB = "https://idp.example|bob"
SHADOW_POLICY = """\
version: ev-1
levels:
  standard: {}
  elevated: {acr: [mfa], max_age: 900, bind: [device]}
routes:
  - {path_prefix: /accounts/, level: elevated}
default_level: standard
rules:
  - {name: offsite, when: {ip_not_in: [10.0.0.0/8]}, raise_to: elevated, mode: shadow}
"""


def rec(i: int, type_: str, ts: int, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": 1,
        "event_id": f"E{i:025d}",
        "ts_ms": ts,
        "type": type_,
        "decision_id": None,
        "user": ALICE,
        "session": "a" * 40,
        "device": "dev1",
        "client_ip": "203.0.113.7",
        "route": None,
        "level": None,
        "outcome": None,
        "reason": None,
        "factor": None,
        "policy_version": "ev-1",
    }
    base.update(kw)
    return base


def journey() -> list[dict[str, Any]]:
    """Two days of records with known counts, plus some outside the period."""
    r: list[dict[str, Any]] = []
    add = r.append
    add(rec(0, "policy.reload", T0 - 1000, outcome="success", new_sha256="s0", user=None))
    for day in (0, 1):
        t = T0 + day * DAY + 3_600_000
        for k in range(3):  # challenges
            add(
                rec(
                    len(r),
                    "stepup.challenge",
                    t + k,
                    level="elevated",
                    outcome="step_up",
                    reason="auth-too-old",
                    route="GET h /accounts/1",
                    shadow="offsite",
                )
            )
        add(
            rec(
                len(r),
                "stepup.completed",
                t + 10,
                level="elevated",
                outcome="success",
                reason="success",
                factor="otp",
                result="success",
            )
        )
        add(
            rec(
                len(r),
                "access.allowed",
                t + 20,
                level="elevated",
                outcome="allow",
                reason="allowed",
                evidence_source="grant",
                route="GET h /accounts/1",
            )
        )
    add(
        rec(
            len(r),
            "stepup.completed",
            T0 + 5000,
            level="elevated",
            outcome="failure",
            reason="acr-insufficient",
            factor="pwd",
            user=BOB,
            session="b" * 40,
        )
    )
    # API: one grant, one refused, a revocation by the same caller
    add(
        rec(
            len(r),
            "stepup.completed",
            T0 + 6000,
            level="elevated",
            outcome="success",
            reason="success",
            factor="otp",
            via="api",
            actor="peer:push",
        )
    )
    add(
        rec(
            len(r),
            "stepup.completed",
            T0 + 6001,
            level="elevated",
            outcome="failure",
            reason="acr-insufficient",
            factor="pwd",
            via="api",
            actor="peer:push",
        )
    )
    add(
        rec(
            len(r),
            "grant.revoked",
            T0 + 7000,
            session="*",
            outcome="revoked",
            revoked=2,
            actor="peer:push",
            level="",
        )
    )
    # two fail-closed intervals: 3 denials 10 s apart, then one an hour later
    for k in range(3):
        add(
            rec(
                len(r),
                "error.fail_closed",
                T0 + 8000 + k * 10_000,
                outcome="error",
                reason="session-store-unavailable",
                level="elevated",
            )
        )
    add(
        rec(
            len(r),
            "error.fail_closed",
            T0 + 3_608_000,
            outcome="error",
            reason="audit-unavailable",
            level="elevated",
        )
    )
    add(rec(len(r), "access.denied", T0 + 9000, outcome="deny", reason="ip-blocked"))
    add(rec(len(r), "logout", T0 + DAY + 9000, outcome="success"))
    add(rec(len(r), "sessions.listed", T0 + 9500, actor="bearer", outcome="ok"))
    add(
        rec(
            len(r),
            "policy.reload",
            T0 + DAY,
            outcome="success",
            new_sha256="s1",
            policy_version="ev-2",
            user=None,
        )
    )
    add(rec(len(r), "audit.gap", T0 + DAY + 1, reason="stream-trimmed", user=None, missing=4))
    add(rec(len(r), "audit.quarantined", T0 + DAY + 2, reason="bad-mac", raw=f"x {BOB}"))
    add(rec(len(r), "some.future.type", T0 + DAY + 3, outcome="whatever"))
    add(rec(len(r), "stepup.challenge", T0 + 2 * DAY + 1, level="elevated"))  # after until
    return r


def write_archive(d: Path, records: list[dict[str, Any]]) -> Path:
    w = ArchiveWriter(d, KEY, max_bytes=4096, checkpoint_every=5, checkpoint_interval_s=3600)
    w.open()
    for i, r in enumerate(records):
        w.append([(f"{1_700_000_000_000 + i}-0", r)])
    w.close()
    return d


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return write_archive(tmp_path / "archive", journey())


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    p = tmp_path / "signing.pem"
    p.write_bytes(KEY.private_pem())
    return p


@pytest.fixture
def pub_file(tmp_path: Path) -> Path:
    p = tmp_path / "signing.pub.pem"
    p.write_bytes(KEY.public_pem())
    return p


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text(SHADOW_POLICY)
    return p


PERIOD = Period(T0, T0 + 2 * DAY)


def facts_of(archive: Path, **kw: Any) -> dict[str, Any]:
    view = read_archive([archive], public_keys={KEY.key_id: KEY.private_key.public_key()})
    return build_facts(view, PERIOD, generated_ms=T0 + 3 * DAY, **kw)


def test_every_figure_is_counted_from_the_records(archive: Path, policy_file: Path) -> None:
    f = facts_of(archive, policy_files=[read_policy(policy_file)])
    assert f["integrity"]["verified"] and not f["unverified"]
    s = f["summary"]
    assert s["records"] == len(journey()) - 2  # the reload before and the challenge after
    assert (s["stepup_challenges"], s["stepups_succeeded"], s["stepups_failed"]) == (6, 2, 1)
    assert (s["sensitive_accesses"], s["fail_closed"], s["logouts"]) == (2, 4, 1)
    assert (s["api_grants"], s["revocations"], s["policy_reloads"]) == (2, 1, 1)
    assert s["users"] == 2
    st = f["stepups"]
    assert st["per_bucket"] == [
        {"bucket": "2026-01-01", "challenges": 3, "success": 1, "failure": 1},
        {"bucket": "2026-01-02", "challenges": 3, "success": 1, "failure": 0},
    ]
    assert {
        (r["level"], r["factor"], r["outcome"], r["count"]) for r in st["by_level_factor_outcome"]
    } == {
        ("elevated", "otp", "success", 2),
        ("elevated", "pwd", "failure", 1),
    }
    assert st["failed_by_user"] == [{"user": BOB, "count": 1}]
    fl = {(r["type"], r["reason"]): r["count"] for r in f["failures"]["by_type_reason"]}
    assert fl == {
        ("error.fail_closed", "session-store-unavailable"): 3,
        ("error.fail_closed", "audit-unavailable"): 1,
        ("stepup.completed", "acr-insufficient"): 2,  # the interactive and the API one
        ("access.denied", "ip-blocked"): 1,
    }
    ivs = f["fail_closed"]["intervals"]
    assert [(i["count"], i["duration_s"]) for i in ivs] == [(3, 20), (1, 0)]
    assert f["sensitive_access"]["by_level"] == {"elevated": 2}
    api = f["api"]
    assert {(r["caller"], r["outcome"], r["count"]) for r in api["grants_by_caller"]} == {
        ("peer:push", "success", 1),
        ("peer:push", "failure", 1),
    }
    assert api["revocations_by_caller"] == [{"caller": "peer:push", "records": 1, "revoked": 2}]
    assert api["other_calls_by_caller"] == [
        {"caller": "bearer", "type": "sessions.listed", "count": 1}
    ]
    assert f["logouts"]["by_type"] == {"logout": 1}
    assert f["shadow"]["rules"] == [
        {"name": "offsite", "action": "raise_to elevated", "policies": ["ev-1"], "fired": 6}
    ]
    assert f["event_types"]["some.future.type"] == 1  # unknown types are data, not errors
    integ = f["integrity"]
    assert (integ["gaps"]["total"], integ["quarantined"]["total"]) == (1, 1)
    assert integ["gaps"]["rows"][0]["reason"] == "stream-trimmed"
    assert [k["key_id"] for k in integ["checkpoint_keys"]] == [KEY.key_id]
    pol = f["policies"]
    assert pol["in_force_at_start"]["new_sha256"] == "s0"  # the reload before the period
    assert [r["version"] for r in pol["reloads"]] == ["ev-2"]
    (pf,) = pol["files"]
    assert pf["routes_by_level"]["elevated"] == ["prefix /accounts/"]
    assert pf["levels"][1]["bind"] == ["device"] and pf["tied_by"] == "decisions (version)"


def test_lines_of_unknown_kinds_are_shown_not_dropped(tmp_path: Path) -> None:
    d = write_archive(tmp_path / "a", journey()[:4])
    seg = list_segments([d])[-1]
    seg.chmod(0o640)
    with seg.open("ab") as f:
        f.write(b'{"kind":"gap","seq_from":5,"seq_to":9,"ts_ms":1767225600001}\n')
        f.write(b'{"kind":"quarantine","ts_ms":1767225600002,"reason":"bad-mac"}\n')
        f.write(b'{"kind":"producer","ts_ms":1767225600003}\n')
    f = facts_of(d)
    integ = f["integrity"]
    assert integ["line_kinds"]["gap"] == 1 and integ["line_kinds"]["producer"] == 1
    assert integ["gaps"]["total"] == 1 and integ["quarantined"]["total"] == 1
    assert integ["other_lines"]["rows"][0]["kind"] == "producer"


def test_fail_closed_intervals_merge_within_the_gap() -> None:
    recs = [{"ts_ms": t, "reason": "x"} for t in (0, 59_000, 118_000, 179_001)]
    assert [i["count"] for i in fail_closed_intervals(recs, 60)] == [3, 1]
    assert [i["count"] for i in fail_closed_intervals(recs, 62)] == [4]


def pack(tmp_path: Path, archive: Path, key_file: Path, **kw: Any) -> Any:
    opts = PackOptions(
        archive=[archive],
        since_ms=PERIOD.since_ms,
        until_ms=PERIOD.until_ms,
        out=tmp_path / "pack",
        signing_key=key_file,
        clock=lambda: (T0 + 3 * DAY) / 1000,
        **kw,
    )
    return make_pack(opts)


def test_pack_files_state_the_same_facts(
    tmp_path: Path, archive: Path, key_file: Path, pub_file: Path, policy_file: Path
) -> None:
    res = pack(tmp_path, archive, key_file, policies=[policy_file])
    assert sorted(p.name for p in res.out.iterdir()) == sorted([*PACK_FILES, MANIFEST])
    facts = json.loads((res.out / "evidence.json").read_text())
    assert facts == json.loads(json.dumps(res.facts))
    html = (res.out / "report.html").read_text()
    assert "The archive verifies" in html and "UNVERIFIED" not in html
    assert html.count('class="chart"') == 6 and "<script" not in html
    assert "Content-Security-Policy" in html
    pdf = PdfReader(res.out / "report.pdf")
    assert len(pdf.pages) == res.pdf_pages >= 2
    first = pdf.pages[0].extract_text()
    assert "The archive verifies" in first
    text = "".join(p.extract_text() for p in pdf.pages)
    assert "offsite" in text and "peer:push" in text and "stream-trimmed" in text
    assert verify_pack(res.out, {KEY.key_id: KEY.private_key.public_key()}).ok


@pytest.mark.parametrize("name", [*PACK_FILES, MANIFEST])
def test_verify_fails_after_any_file_changes(
    tmp_path: Path, archive: Path, key_file: Path, name: str
) -> None:
    res = pack(tmp_path, archive, key_file)
    keys = {KEY.key_id: KEY.private_key.public_key()}
    path = res.out / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    path.write_bytes(bytes(data))
    check = verify_pack(res.out, keys)
    assert not check.ok, name
    assert any(name in p for p in check.problems), check.problems


def test_verify_fails_on_an_added_or_removed_file_or_another_key(
    tmp_path: Path, archive: Path, key_file: Path
) -> None:
    res = pack(tmp_path, archive, key_file)
    keys = {KEY.key_id: KEY.private_key.public_key()}
    (res.out / "notes.txt").write_text("x")
    assert "not in the manifest: notes.txt" in verify_pack(res.out, keys).problems[0]
    (res.out / "notes.txt").unlink()
    (res.out / "report.pdf").unlink()
    assert any("report.pdf: missing" in p for p in verify_pack(res.out, keys).problems)
    other = SigningKey.generate()
    assert (
        "not a given key"
        in verify_pack(res.out, {other.key_id: other.private_key.public_key()}).problems[0]
    )


def _tamper(archive: Path) -> None:
    seg = list_segments([archive])[0]
    seg.chmod(0o640)
    seg.write_bytes(seg.read_bytes().replace(b'"outcome":"step_up"', b'"outcome":"allow"', 1))


def test_a_broken_archive_is_refused_unless_allowed_and_then_it_says_so(
    tmp_path: Path, archive: Path, key_file: Path
) -> None:
    _tamper(archive)
    with pytest.raises(PackRefused, match="modified"):
        pack(tmp_path, archive, key_file)
    assert not (tmp_path / "pack").exists()
    res = pack(tmp_path, archive, key_file, allow_unverified=True)
    assert res.facts["unverified"] and res.facts["allow_unverified"]
    first = PdfReader(res.out / "report.pdf").pages[0].extract_text()
    assert "UNVERIFIED" in first and "FAILED verification" in first
    html = (res.out / "report.html").read_text()
    assert html.index("UNVERIFIED") < html.index("<h2>")  # before the first section


def test_pseudonymised_pack_names_no_user(tmp_path: Path, archive: Path, key_file: Path) -> None:
    res = pack(tmp_path, archive, key_file, pseudonymise=True)
    for name in PACK_FILES:
        data = (res.out / name).read_bytes()
        assert b"alice" not in data and b"bob" not in data, name
    assert res.facts["stepups"]["failed_by_user"][0]["user"].startswith("user-")
    key = b"k" * 32
    assert Pseudonyms(key)(BOB) == Pseudonyms(key)(BOB) != Pseudonyms(b"j" * 32)(BOB)


def test_pack_refuses_bad_inputs(tmp_path: Path, archive: Path, key_file: Path) -> None:
    (tmp_path / "pack").mkdir()
    (tmp_path / "pack" / "x").write_text("")
    with pytest.raises(PackError, match="not an empty directory"):
        pack(tmp_path, archive, key_file)
    shutil.rmtree(tmp_path / "pack")
    with pytest.raises(PackError, match="no such file"):
        pack(tmp_path, tmp_path / "nowhere", key_file)
    with pytest.raises(PackError, match="signing-key"):
        pack(tmp_path, archive, tmp_path / "policy-missing.pem")
    bad = tmp_path / "sec.md"
    bad.write_text("# nothing here\n")
    with pytest.raises(PackError, match="Summary"):
        pack(tmp_path, archive, key_file, security_report=bad)


def test_security_report_summary_is_read_from_the_generated_file() -> None:
    sec = read_security_report(ROOT / "docs" / "security-tests.md")
    assert sec["categories"] and sec["total_cases"] == sum(c["cases"] for c in sec["categories"])
    assert sum(sec["verdicts"].values()) == sec["total_cases"]
    with pytest.raises(InputError):
        read_security_report(ROOT / "nope.md")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_bad_input_gets_a_message_not_a_traceback(
    tmp_path: Path,
    archive: Path,
    key_file: Path,
    pub_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["evidence", "--archive", str(archive), "--signing-key", str(key_file)]
    code, _, err = run([*base, "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "the period is required" in err
    code, _, err = run(
        [*base, "--since", "2026-01-02", "--until", "2026-01-01", "--out", str(tmp_path / "p")],
        capsys,
    )
    assert code == 2 and "--until must be after --since" in err
    code, _, err = run(
        [*base, "--since", "yesterday", "--until", "2026-01-01", "--out", str(tmp_path / "p")],
        capsys,
    )
    assert code == 2 and "--since 'yesterday' is not a time" in err
    _tamper(archive)
    code, _, err = run(
        [*base, "--since", "2026-01-01", "--until", "2026-01-03", "--out", str(tmp_path / "p")],
        capsys,
    )
    assert code == 1 and "refused: the archive does not verify: modified" in err
    assert not (tmp_path / "p").exists()
    code, out, _ = run(
        [
            *base,
            "--since",
            "2026-01-01",
            "--until",
            "2026-01-03",
            "--allow-unverified",
            "--out",
            str(tmp_path / "{since}_{until}"),
        ],
        capsys,
    )
    assert code == 0 and "UNVERIFIED" in out
    made = tmp_path / "2026-01-01_2026-01-03"
    code, out, _ = run(["evidence", "verify", str(made), "--pubkey", str(pub_file)], capsys)
    assert code == 0 and "OK: pack signed by key" in out
    code, _, err = run(
        ["evidence", "verify", str(tmp_path / "none"), "--pubkey", str(pub_file)], capsys
    )
    assert code == 2 and "not a directory" in err
