"""The CLI's offline commands: policy check and policy explain (with signals)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from authz.cli import main

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_025_200

POLICY = """\
levels:
  standard: {}
  elevated: {acr: [mfa], max_age: 900}
  high: {acr: [phr], max_age: 300}
routes:
  - {path_prefix: /accounts/, level: elevated}
default_level: standard
signals:
  sensitive_level: elevated
  velocity: {window_s: 60, max: 10}
rules:
  - {name: new-device, when: {signals_any: [new-device]}, raise_to: elevated}
  - {name: fast, when: {signals_any: [velocity]}, raise_to: high, mode: shadow}
"""


def test_policy_check_ok_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(ROOT / "examples" / "policy.yaml")]) == 0
    assert "ok:" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace("level: elevated}", "level: elevatd}"))
    assert main(["policy", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:line 6, column 38 (routes.0.level): unknown level 'elevatd'" in err


def explain(tmp_path: Path, request: dict[str, object], *, as_json: bool = True) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    req = tmp_path / "req.json"
    req.write_text(json.dumps(request))
    args = ["policy", "explain", str(policy), "--request", str(req)]
    assert main([*args, "--json"] if as_json else args) == 0


BASE = {
    "method": "GET",
    "host": "app.test",
    "path": "/accounts/1",
    "source_ip": "10.0.0.1",
    "now": NOW,
    "claims": {
        "iss": "https://idp",
        "sub": "alice",
        "sid": "s1",
        "acr": "pwd",
        "amr": ["pwd"],
        "auth_time": NOW - 60,
        "iat": NOW - 60,
    },
}


def run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: dict[str, object],
    *,
    as_json: bool = True,
) -> str:
    explain(tmp_path, {**BASE, **extra}, as_json=as_json)
    return capsys.readouterr().out


def test_explain_step_up_and_signals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = json.loads(
        run(
            tmp_path,
            capsys,
            {
                "device": {"id": "laptop", "source": "cookie"},
                "state": {"device_known": False, "velocity": 11},
            },
        )
    )
    assert out["decision"] == "step_up" and out["level"] == "elevated"
    assert out["signals"] == ["new-device", "velocity"]
    assert out["fired"] == ["new-device"] and out["shadow"] == ["fast"]
    assert out["acr_values"] == ["mfa"] and out["max_age"] == 900
    assert out["risk"] == 60


def test_explain_grant_allows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = json.loads(
        run(
            tmp_path,
            capsys,
            {
                "grants": [
                    {
                        "level": "elevated",
                        "acr": "mfa",
                        "amr": ["otp"],
                        "auth_time": NOW - 30,
                        "expires_at": NOW + 870,
                    }
                ]
            },
        )
    )
    assert (out["decision"], out["reason"]) == ("allow", "allowed")


def test_explain_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = run(tmp_path, capsys, {"state": {"velocity": 11}}, as_json=False)
    assert "decision: step_up (acr-insufficient)" in text
    assert "shadow:   fast (would have applied; not enforced)" in text
    assert "signals:  no-device, velocity" in text


def test_explain_refuses_a_bad_request_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"path": "/a%2Fb"}))
    assert (
        main(["policy", "explain", str(policy), "--request", str(req)]) == 2
    )  # exit 2: the input, not the policy, is wrong
    assert "invalid request file" in capsys.readouterr().err
