"""Bad input through every CLI command, each as a real subprocess: the exit code, a short
message naming what failed, and never a traceback.

Exit codes: 2 usage / configuration / unreadable input, 1 a failed check or an unreachable
dependency (authz/cli.py). Dependencies that misbehave are real sockets on loopback: a
closed port, a gRPC server without the Sessions API. (An IdP that is down, answers 404 or
hangs does not stop ``serve``: it starts degraded, tests/faults/test_degraded_start.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "examples" / "policy.yaml"
CLI = [sys.executable, "-m", "authz.cli"]
DEVIDP = [sys.executable, "-m", "authz.devidp"]
DEMO = [sys.executable, "-m", "authz.demo"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def grpc_without_api() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


@dataclass
class Case:
    name: str
    argv: list[str]
    code: int
    says: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    max_lines: int = 2  # stderr lines (a file with several problems has one line each)
    never: tuple[str, ...] = ()


SETTINGS_TYPO = f"""\
policy_file: {POLICY}
oidc:
  issuer: https://idp.example
  client_id: stepup-authz
  audiance: trading-api
grpc: {{port: nine, hots: 127.0.0.1}}
logs: {{level: INFO}}
"""


def cases(grpc_without_api: str) -> list[Case]:
    down = f"127.0.0.1:{closed_port()}"
    user = ["--user", "https://idp", "alice"]
    return [
        # -- the top level
        Case("no command", [], 2, ("required",)),
        Case("unknown command", ["frobnicate"], 2, ("invalid choice",)),
        # -- serve
        Case("serve without --config", ["serve"], 2, ("--config",)),
        Case("serve, missing file", ["serve", "--config", "nope.yaml"], 2, ("cannot read",)),
        Case(
            "serve --workers 0",
            ["serve", "--config", "x", "--workers", "0"],
            2,
            (">= 1",),
        ),
        Case(
            "serve, every settings problem at once",
            ["serve", "--config", "{s.yaml}"],
            2,
            (
                "4 problems",
                "line 5, column 13 (oidc.audiance): unknown key 'audiance'; "
                "did you mean 'audience'?",
                "(grpc.port): Input should be a valid integer",
                "(grpc.hots): unknown key 'hots'; did you mean 'host'?",
                "(logs): unknown key 'logs'; did you mean 'log'?",
            ),
            {"s.yaml": SETTINGS_TYPO},
            max_lines=5,
            never=("Field required", "audience: required"),
        ),
        Case(
            "serve, broken YAML",
            ["serve", "--config", "{s.yaml}"],
            2,
            ("s.yaml:line 2, column 12: invalid YAML",),
            {"s.yaml": "oidc: {issuer: x\npolicy_file: p\n"},
        ),
        # -- policy
        Case("policy check, missing file", ["policy", "check", "nope.yaml"], 2, ("no such file",)),
        Case(
            "policy check, invalid policy",
            ["policy", "check", "{p.yaml}"],
            1,
            ("unknown level 'elevatd'",),
            {
                "p.yaml": "levels: {standard: {}}\ndefault_level: standard\n"
                "routes:\n  - {path_prefix: /a/, level: elevatd}\n"
            },
        ),
        Case(
            "policy explain, missing request",
            ["policy", "explain", str(POLICY), "--request", "nope.json"],
            2,
            ("invalid request file", "cannot read"),
        ),
        Case(
            "policy explain, not JSON",
            ["policy", "explain", str(POLICY), "--request", "{r.json}"],
            2,
            ("not valid JSON", "line 1, column 3"),
            {"r.json": "{ nope"},
        ),
        Case(
            "policy explain, a grant without expires_at",
            ["policy", "explain", str(POLICY), "--request", "{r.json}"],
            2,
            ("(grants.0.expires_at): required field missing",),
            {
                "r.json": json.dumps(
                    {"claims": {"iss": "i", "sub": "s"}, "grants": [{"level": "elevated"}]},
                    indent=1,
                )
            },
            never=("'expires_at'\n", "KeyError"),
        ),
        Case(
            "policy explain, a number that is not one",
            ["policy", "explain", str(POLICY), "--request", "{r.json}"],
            2,
            ("(now): Input should be a valid integer",),
            {"r.json": '{"now": "soon"}'},
            never=("invalid literal",),
        ),
        Case(
            "policy explain, a typo'd field",
            ["policy", "explain", str(POLICY), "--request", "{r.json}"],
            2,
            ("unknown key 'pth'; did you mean 'path'?",),
            {"r.json": '{"pth": "/accounts/1"}'},
        ),
        Case(
            "policy explain, a path that does not canonicalise",
            ["policy", "explain", str(POLICY), "--request", "{r.json}"],
            2,
            ("cannot be decided", "encoded slash"),
            {"r.json": '{"path": "/a%2Fb"}'},
        ),
        # -- render
        Case(
            "render istio without a selector",
            ["render", "istio", "--policy", str(POLICY), "--namespace", "trading"],
            2,
            ("--selector", "--all-workloads"),
        ),
        Case(
            "render istio without a namespace",
            ["render", "istio", "--policy", str(POLICY), "--all-workloads"],
            2,
            ("--namespace",),
        ),
        Case(
            "render envoy, missing policy",
            ["render", "envoy", "--policy", "nope.yaml"],
            2,
            ("invalid policy", "cannot read"),
        ),
        Case(
            "render envoy, a tracing URL that is not http",
            ["render", "envoy", "--policy", str(POLICY), "--tracing-otlp", "ftp://c:1"],
            2,
            ("http:// URL",),
        ),
        Case(
            "render envoy, an output it cannot write",
            ["render", "envoy", "--policy", str(POLICY), "--host", "a.example", "-o", "/proc/x/e"],
            2,
            ("cannot write",),
        ),
        Case(
            "render envoy, an istio flag",
            ["render", "envoy", "--policy", str(POLICY), "--selector", "a=b"],
            2,
            ("unrecognized arguments",),
        ),
        # -- sessions
        Case(
            "sessions list, nothing listening",
            ["sessions", "list", "--target", down, *user, "--timeout", "2"],
            1,
            ("UNAVAILABLE", "cannot reach the service"),
        ),
        Case(
            "sessions list, a service without the API",
            ["sessions", "list", "--target", grpc_without_api, *user],
            1,
            ("UNIMPLEMENTED", "does not serve the Sessions API", "api.enabled: true"),
        ),
        Case(
            "sessions list, missing token file",
            ["sessions", "list", "--target", down, *user, "--token-file", "nope"],
            2,
            ("cannot read --token-file",),
        ),
        Case(
            "sessions list, --cert without --key",
            ["sessions", "list", "--target", down, *user, "--cert", "c.pem"],
            2,
            ("--cert and --key go together",),
        ),
        Case(
            "sessions grant, a ttl that is not a number",
            [
                "sessions",
                "grant",
                "--target",
                down,
                *user,
                "--session",
                "s",
                "--level",
                "x",
                "--ttl",
                "long",
            ],
            2,
            ("invalid int value",),
        ),
        # -- audit
        Case("audit verify, missing archive", ["audit", "verify", "nope"], 2, ("nope",)),
        Case(
            "audit verify, a bad public key",
            ["audit", "verify", "--pubkey", "{k.pem}", "."],
            2,
            ("not an Ed25519 public key PEM",),
            {"k.pem": "not a key"},
            never=("cryptography.io",),
        ),
        Case(
            "audit export, a bad --since",
            ["audit", "export", "--since", "last tuesday", "."],
            2,
            ("expected ISO 8601",),
            never=("isoformat",),
        ),
        Case(
            "audit tail, Redis down",
            ["audit", "tail", "--no-follow", "--redis-url", f"redis://{down}"],
            1,
            ("cannot read the stream", "--redis-url"),
        ),
        Case("audit tail, missing archive", ["audit", "tail", "nope"], 2, ("nope",)),
        Case(
            "audit exporter, missing settings",
            ["audit", "exporter", "--config", "nope.yaml"],
            2,
            ("invalid settings", "cannot read"),
        ),
        Case(
            "audit keygen, unwritable --out",
            ["audit", "keygen", "--out", "/proc/none"],
            2,
            ("cannot write into /proc/none",),
        ),
        # -- demo (refused before anything starts)
        Case("demo, a port that is not one", ["demo", "--port", "http"], 2, ("port",)),
        Case(
            "demo, a port out of range",
            ["demo", "--idp-port", "70000"],
            2,
            ("0-65535",),
            max_lines=8,
        ),
    ]


def _run(argv: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPUP_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_bad_inputs_get_short_answers_and_no_traceback(
    tmp_path: Path, grpc_without_api: str
) -> None:
    failures: list[str] = []
    table = cases(grpc_without_api)
    assert len(table) >= 35
    for case in table:
        work = tmp_path / case.name.replace(" ", "-").replace(",", "").replace("'", "")
        work.mkdir()
        names = {}
        for name, text in case.files.items():
            (work / name).write_text(text)
            names["{" + name + "}"] = str(work / name)
        argv = [names.get(a, a) for a in case.argv]
        r = _run([*CLI, *argv], work)
        out = r.stdout + r.stderr
        problems = []
        if r.returncode != case.code:
            problems.append(f"exit {r.returncode}, expected {case.code}")
        if "Traceback" in out:
            problems.append("a traceback")
        problems += [f"no {s!r}" for s in case.says if s not in out]
        problems += [f"says {s!r}" for s in case.never if s in out]
        lines = r.stderr.strip().splitlines()
        if not lines or len(lines) > case.max_lines:
            problems.append(f"{len(lines)} stderr lines")
        if problems:
            failures.append(f"{case.name}: {'; '.join(problems)}\n{out}")
    assert not failures, "\n\n".join(failures)


def test_version(tmp_path: Path) -> None:
    r = _run([*CLI, "--version"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("stepup-authz 0."), r


def test_the_table_catches_a_traceback(tmp_path: Path) -> None:
    """The detector works, and the last-resort guard holds: a bug below the CLI (here a
    broken read_policy) is one line without a traceback, and STEPUP_TRACEBACK=1 shows it."""
    crash = (
        "import sys; import authz.config.policy_file as p; p.read_policy = None; "
        f"from authz.cli import main; sys.exit(main(['policy', 'check', {str(POLICY)!r}]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPUP_")}
    env["PYTHONPATH"] = str(ROOT)
    guarded = subprocess.run(
        [sys.executable, "-c", crash], env=env, capture_output=True, text=True, check=False
    )
    assert guarded.returncode == 1
    assert "Traceback" not in guarded.stderr
    assert "unexpected error: TypeError" in guarded.stderr
    assert "STEPUP_TRACEBACK=1" in guarded.stderr
    shown = subprocess.run(
        [sys.executable, "-c", crash],
        env={**env, "STEPUP_TRACEBACK": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Traceback" in shown.stderr and shown.returncode == 1


def test_devidp_helper_bad_inputs(tmp_path: Path) -> None:
    r = _run([*DEVIDP, "totp", "--user", "mallory"], tmp_path)
    assert r.returncode == 2 and "unknown user 'mallory'" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = _run([*DEVIDP, "serve", "--port", str(port)], tmp_path)
    assert r.returncode == 1 and "choose --port" in r.stderr, r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_demo_names_a_busy_port_before_writing_anything(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        argv = [*DEMO, "--port", "0", "--admin-port", str(port), "--idp-port", "0"]
        r = _run([*argv, "--workdir", str(tmp_path / "demo")], tmp_path)
    assert r.returncode == 1, r.stderr
    assert f"port {port} (Envoy admin) is already in use" in r.stderr
    assert "--admin-port N" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "demo" / "config.yaml").exists()
    assert not (tmp_path / "demo" / "envoy.yaml").exists()


def test_a_second_stack_leaves_a_running_ones_workdir_alone(tmp_path: Path) -> None:
    """The lock alone (ports all free): a stack owning the workdir keeps its files."""
    from authz.demo.stack import Stack, WorkdirInUse

    first = Stack(tmp_path, policy_file=POLICY)
    first._claim()  # what start() does first: ports checked, the workdir locked
    try:
        (tmp_path / "config.yaml").write_text("the running demo's\n")
        second = Stack(tmp_path, policy_file=POLICY)
        with pytest.raises(WorkdirInUse, match=f"pid {os.getpid()}"):
            second.start()
        assert (tmp_path / "config.yaml").read_text() == "the running demo's\n"
    finally:
        first._release()
    with contextlib.suppress(FileNotFoundError):
        (tmp_path / ".stack.lock").unlink()
