"""Every command the README, the operator docs and the demo's guide print works when pasted
into a fresh shell in the clone.

The demo is started the way the README says, ``make demo ARGS=...`` (every port 0: free
ports, so the test never collides with a demo or a test run beside it). Its guide and the
README's "What to try" block are then run by bash with a fresh shell's environment (no
venv on PATH, nothing activated), each command as printed; the README's fixed demo ports
are rewritten to the ports this demo got. Each command's output must show what the text
around it promises. A ``sh`` block in docs/operations.md or docs/runbooks.md is run the
same way in a scratch directory (with the clone's ``.venv``), unless its first line says
``# needs: ...`` (a cluster, a production secret store): then each ``stepup-authz`` command
in it must still be accepted by the CLI's own parser, as must every ``stepup-authz``
command anywhere in README.md and docs/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from authz.cli import build_parser
from tests.e2e.test_stepup_flow import Browser

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUN_DOCS = [ROOT / "docs" / "operations.md", ROOT / "docs" / "runbooks.md"]
GUIDE_END = "Ctrl-C stops everything."


def fresh_env(home: Path) -> dict[str, str]:
    """What a new terminal has: the system PATH, no venv, no proxies, no STEPUP_*."""
    return {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


@dataclass
class Demo:
    guide: str
    envoy: str  # http://127.0.0.1:PORT
    idp: str
    workdir: Path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    workdir = tmp_path_factory.mktemp("printed") / "demo"
    out = workdir.parent / "make-demo.out"
    # A longer ext_authz deadline than the demo's 0.25 s: this machine is shared, and under
    # another's load a late Check is Envoy's bare 403, not what the guide promises.
    args = f"--port 0 --admin-port 0 --idp-port 0 --authz-timeout 2s --workdir {workdir}"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("STEPUP")}
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            ["make", "-s", "demo", f"ARGS={args}"],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own group: stopped as a whole, by its id
        )
    try:
        # The stack's own readiness probes bound the start (20 s a component); this only
        # waits for the guide they lead to.
        deadline = time.monotonic() + 150
        while GUIDE_END not in (text := out.read_text(errors="replace")):
            assert proc.poll() is None, f"make demo exited {proc.returncode}:\n{text}"
            assert time.monotonic() < deadline, f"no guide after 150 s:\n{text}"
            time.sleep(0.2)
        guide = text[text.index("stepup-authz demo is up") :]
        envoy = re.search(r"app, through Envoy\s+(\S+)", guide)
        idp = re.search(r"dev IdP\s+(\S+)", guide)
        assert envoy and idp, guide
        yield Demo(guide, envoy.group(1), idp.group(1), workdir)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- finding commands --------------------------------------------------------------------


def join_continuations(lines: list[str]) -> list[str]:
    commands: list[str] = []
    pending = ""
    for line in lines:
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        commands.append(pending)
        pending = ""
    assert not pending, f"a continuation with nothing after it: {pending!r}"
    return commands


def guide_commands(guide: str) -> list[str]:
    """Lines indented by five spaces (plus their backslash continuations)."""
    lines = guide.splitlines()
    picked: list[str] = []
    i = 0
    while i < len(lines):
        if re.match(r"^ {5}\S", lines[i]):
            picked.append(lines[i])
            while lines[i].rstrip().endswith("\\"):
                i += 1
                picked.append(lines[i])
        i += 1
    return join_continuations(picked)


def sh_blocks(path: Path) -> list[str]:
    return re.findall(r"^ *```sh\n(.*?)^ *```", path.read_text(), flags=re.M | re.S)


def block_commands(block: str) -> list[str]:
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    # A trailing comment is the reader's, not the shell's: keep it (bash ignores it).
    return join_continuations(lines)


def run_script(commands: list[str], cwd: Path, home: Path) -> list[tuple[str, int, str]]:
    """Run ``commands`` in one bash (shell variables carry over, as in a terminal);
    returns (command, exit status, output) for each."""
    marker = "@@@cmd-done"
    script = "".join(f'{c}\necho "{marker} $?"\n' for c in commands)
    r = subprocess.run(
        ["bash", "--noprofile", "--norc"],
        input=script,
        cwd=cwd,
        env=fresh_env(home),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    merged = r.stdout
    parts = re.split(rf"{marker} (\d+)\n", merged)
    outputs = parts[0:-1:2]
    codes = [int(c) for c in parts[1::2]]
    assert len(codes) == len(commands), f"{len(codes)} of {len(commands)} ran:\n{merged}{r.stderr}"
    # stderr is one stream for the whole script: attach it to every result (it is short).
    return [
        (c, code, out + r.stderr) for c, code, out in zip(commands, codes, outputs, strict=True)
    ]


def check(results: list[tuple[str, int, str]], expectations: list[tuple[str, list[str]]]) -> None:
    """Each command matches exactly one (command regex, output regexes) row; every row is
    used; each command exits 0 and prints what its row says."""
    used: set[int] = set()
    problems: list[str] = []
    for command, code, out in results:
        rows = [i for i, (pat, _) in enumerate(expectations) if re.search(pat, command)]
        if len(rows) != 1:
            problems.append(f"{len(rows)} expectations match {command!r}")
            continue
        used.add(rows[0])
        if code != 0:
            problems.append(f"exit {code}: {command}\n{out}")
        for want in expectations[rows[0]][1]:
            if not re.search(want, out, flags=re.I | re.M):
                problems.append(f"no /{want}/ from: {command}\n{out[:2000]}")
        if "Traceback" in out:
            problems.append(f"a traceback from: {command}\n{out}")
    unused = [expectations[i][0] for i in range(len(expectations)) if i not in used]
    assert not problems and not unused, "\n\n".join(problems) + f"\nunused: {unused}"


# -- the demo's guide and the README, against the demo -------------------------------------

GUIDE_EXPECTATIONS = [
    (r"devidp totp --user alice$", [r"^\d{6}$"]),
    (r"^curl -si http://\S+/accounts/123$", [r"^HTTP/1.1 401", r"^www-authenticate: Bearer"]),
    (r"Accept: text/html", [r"^HTTP/1.1 302", r"^location: /_stepup/login"]),
    (r"^TOKEN=(?!.*otp=)", []),
    (r"^TOKEN=.*-d otp=", []),
    (r'^curl -si -H "Authorization', [r"^HTTP/1.1 401", r"insufficient_user_authentication"]),
    (r'^curl -s -H "Authorization', [r'"x-stepup-acr": "mfa"', r'"x-stepup-user": "alice"']),
    (r"audit export ", [r'"type":"stepup.completed"', r'"type":"stepup.challenge"']),
    (r"audit verify --pubkey \S+ \S+/audit$", [r"^OK$"]),
    (r"outcome.*audit verify", [r"FAILED: first broken link: modified", r"^exit 1$"]),
    # A deletion right before a checkpoint is caught by the checkpoint (its seq and hash no
    # longer match): the guide says so, since where checkpoints fall depends on timing.
    (
        r"stepup.completed.*audit verify",
        [r"FAILED: first broken link: (deleted|bad-checkpoint)", r"^exit 1$"],
    ),
    (r"audit tail", [r'"kind":"(event|checkpoint)"']),
    # Step 6: the evidence pack of today, its verification, and alice's decisions.
    (r"evidence --archive", [r"^evidence pack \S+: .*report\.pdf \d+ pages; manifest signed"]),
    (r"evidence verify", [r"^OK: pack signed by key"]),
    (r"audit incident --user", [r"stepup.completed|access\.|stepup\."]),
]


async def _step_up_in_a_browser(demo: Demo) -> None:
    """Step 4 of the guide (the browser round trip), so that step 5 has its records."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        browser = Browser(session, types.SimpleNamespace(envoy_url=demo.envoy))  # type: ignore[arg-type]
        await browser.sign_in("/accounts/123")
        await browser.step_up("/accounts/123")


def _wait_archived(demo: Demo, home: Path) -> None:
    # The exporter moves records within its 0.2 s blocking read; poll its real output
    # (bounded) rather than sleeping a fixed time.
    cli = ROOT / ".venv" / "bin" / "stepup-authz"
    argv = [str(cli), "audit", "export", "--type", "stepup.completed", str(demo.workdir / "audit")]
    deadline = time.monotonic() + 30
    while True:
        r = subprocess.run(argv, capture_output=True, text=True, check=False, env=fresh_env(home))
        if '"stepup.completed"' in r.stdout:
            return
        assert time.monotonic() < deadline, r.stdout + r.stderr
        time.sleep(0.2)


def _wait_caught_up(demo: Demo) -> None:
    """Until the newest record in the audit stream is in the archive (bounded)."""
    import redis

    from authz.audit.segments import list_segments

    m = re.search(r"Redis\s+(redis://\S+)", demo.guide)
    assert m, demo.guide
    client = redis.Redis.from_url(m.group(1))

    def archived() -> tuple[int, int]:
        for seg in reversed(list_segments([demo.workdir / "audit"])):
            for raw in reversed(seg.read_bytes().split(b"\n")):
                if b'"kind":"event"' in raw:
                    with contextlib.suppress(ValueError):
                        ms, _, seq = str(json.loads(raw)["stream_id"]).partition("-")
                        return int(ms), int(seq)
        return (0, 0)

    try:
        deadline = time.monotonic() + 30
        while True:
            last = client.xinfo_stream("stepup:audit")["last-generated-id"].decode()
            ms, _, seq = last.partition("-")
            if archived() >= (int(ms), int(seq)):
                return
            assert time.monotonic() < deadline, f"archive behind the stream at {last}"
            time.sleep(0.1)
    finally:
        client.close()


async def test_every_command_in_the_demo_guide_works_as_printed(demo: Demo, tmp_path: Path) -> None:
    commands = guide_commands(demo.guide)
    assert len(commands) == len(GUIDE_EXPECTATIONS), commands
    assert not [c for c in commands if re.match(r"(stepup-authz|python) ", c)], (
        "a bare tool name needs an activated venv"
    )
    await _step_up_in_a_browser(demo)
    _wait_archived(demo, tmp_path)
    # The requests of steps 1-3 add records; the archive steps run once they are archived
    # (a verify racing the exporter's write of a segment's last line reports it torn).
    first_audit = next(i for i, c in enumerate(commands) if " audit " in c)
    results = run_script(commands[:first_audit], ROOT, tmp_path)
    _wait_caught_up(demo)
    results += run_script(commands[first_audit:], ROOT, tmp_path)
    check(results, GUIDE_EXPECTATIONS)


README_EXPECTATIONS = [
    (r"^curl -si http://\S+/accounts/123$", [r"^HTTP/1.1 401", r"^www-authenticate: Bearer"]),
    (r"Accept: text/html", [r"^HTTP/1.1 302"]),
    (r"^IDP=", []),
    (r"^TOKEN=(?!.*otp)", []),
    (r"^TOKEN=.*otp=", []),
    (
        r'^curl -si -H "Authorization',
        [r"insufficient_user_authentication", r'acr_values="mfa phr"'],
    ),
    (r'^curl -s -H "Authorization', [r'"x-stepup-acr": "mfa"']),
]


def readme_try_block() -> str:
    blocks = [b for b in sh_blocks(README) if "# 1. An API client" in b]
    assert len(blocks) == 1
    return blocks[0]


def test_every_command_in_the_readme_works_as_printed(demo: Demo, tmp_path: Path) -> None:
    block = readme_try_block()
    host_port = demo.envoy.removeprefix("http://")
    assert "127.0.0.1:8080" in block and "IDP=http://127.0.0.1:9400" in block
    block = block.replace("127.0.0.1:8080", host_port).replace(
        "IDP=http://127.0.0.1:9400", f"IDP={demo.idp}"
    )
    commands = block_commands(block)
    assert len(commands) == len(README_EXPECTATIONS), commands
    check(run_script(commands, ROOT, tmp_path), README_EXPECTATIONS)
    # The README's other sh block is `make demo` (this fixture) and `make test` (CI itself).
    others = [b for b in sh_blocks(README) if "# 1. An API client" not in b]
    assert [[c.split("#")[0].strip() for c in block_commands(b)] for b in others] == [
        ["make demo", "make test"]
    ]


def test_a_failing_totp_helper_is_loud_not_an_empty_otp(demo: Demo, tmp_path: Path) -> None:
    """The README's step 4 with a helper that fails (an unknown user): the token request
    says why, rather than the IdP issuing a password-only token and the route a 401."""
    block = readme_try_block().replace("127.0.0.1:8080", demo.envoy.removeprefix("http://"))
    block = block.replace("IDP=http://127.0.0.1:9400", f"IDP={demo.idp}")
    commands = [c.replace("--user alice", "--user nobody") for c in block_commands(block)]
    results = run_script([c for c in commands if c.startswith(("IDP=", "TOKEN="))], ROOT, tmp_path)
    _, _, out = results[-1]
    assert "unknown user 'nobody'" in out
    assert "token request refused" in out and "otp is empty" in out


# -- operator docs -------------------------------------------------------------------------


def test_operator_doc_commands_run_as_printed(tmp_path: Path) -> None:
    """docs/operations.md and docs/runbooks.md: each runnable block in a scratch directory
    that has the clone's venv, so generated keys and archives land there."""
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    for target in ("examples",):
        (tmp_path / target).symlink_to(ROOT / target)
    ran = 0
    for doc in RUN_DOCS:
        for block in sh_blocks(doc):
            if block.lstrip().startswith("# needs:"):
                continue
            commands = block_commands(block)
            for command, code, out in run_script(commands, tmp_path, tmp_path):
                assert code == 0, f"{doc.name}: exit {code}: {command}\n{out}"
                assert "Traceback" not in out, f"{doc.name}: {command}\n{out}"
                ran += 1
    assert ran >= 8


# -- every stepup-authz command the docs name parses ---------------------------------------

_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "$(", "`"}


def _invocations(piece: str) -> list[list[str]]:
    """argv lists of the ``stepup-authz`` commands in one shell text, at command position
    (first word, or after ``;``, ``&&``, ``|``, ``$(``), up to the next separator."""
    lexer = shlex.shlex(piece.replace("$(", " ( "), posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:
        return [["<unbalanced quotes>", piece]]
    found: list[list[str]] = []
    at_command = True
    current: list[str] | None = None
    for tok in tokens:
        if tok in _SEPARATORS:
            if current is not None:
                found.append(current)
            current, at_command = None, True
            continue
        if current is not None:
            current.append(tok)
        elif at_command and (tok == "stepup-authz" or tok.endswith("/bin/stepup-authz")):
            current = []
        at_command = False
    if current is not None:
        found.append(current)
    return found


def cli_invocations(text: str) -> list[list[str]]:
    """``stepup-authz`` commands in sh blocks, and in inline code that gives options (a
    bare ``stepup-authz audit tail`` in prose names a command, it is not one to paste).
    Placeholders (``...``, ``<key id>``, ``[--json]``, ``a|b``) are not meant to be pasted."""
    pieces = [b.replace("\\\n", " ") for b in re.findall(r"```sh\n(.*?)```", text, re.S)]
    pieces += [
        " ".join(m.split())
        for m in re.findall(r"(?<!`)`([^`]+)`(?!`)", text)
        if "--" in m and "stepup-authz" in m
    ]
    out = []
    lines = [ln for piece in pieces for ln in piece.splitlines()]
    for line in lines:
        if re.search(r"\b[a-z-]+\|[a-z-]+\|", line):  # `list|revoke|grant`: choices
            continue
        for argv in _invocations(line):
            joined = " ".join(argv)
            if any(t in joined for t in ("...", "…", "<", "[", "FILE")) or " | " in joined:
                continue
            out.append(argv)
    return out


def test_every_stepup_authz_command_in_the_docs_parses() -> None:
    parser = build_parser()
    checked = 0
    failures = []
    for doc in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for argv in cli_invocations(doc.read_text()):
            if argv and argv[0] in ("--version", "--help"):
                continue
            try:
                parser.parse_args(argv)
            except SystemExit:
                failures.append(f"{doc.name}: stepup-authz {shlex.join(argv)}")
            checked += 1
    assert checked >= 12
    assert not failures, "\n".join(failures)


def test_the_parse_check_can_fail() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(shlex.split("render istio --policy p.yaml --selctor app=x"))
