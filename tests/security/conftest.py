"""The adversarial suite's fixtures and its tally.

One stack for the whole suite (Valkey, the dev IdP, the echo upstream, stepup-authz, Envoy),
started with ``tests/security/policy.yaml``, an IdP signing key generated here (so tests can
mint tokens that differ from the IdP's in exactly one property) and the IdP's TEST-ONLY
misbehaviour knobs enabled.

Every case records what it expected and what it saw (``outcome(expected, observed)``); at
the end of the run the terminal summary prints one table of all cases, and with
``SECURITY_REPORT=path.md`` the same table is written as Markdown.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from authz.demo.stack import LOOPBACK_HOSTS, Stack
from authz.devidp.config import SigningKey

from .helpers import POLICY_FILE, Browser, Minter, set_knobs

_SUITE = "tests/security/"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "security: adversarial case (tests/security): asserts a safe outcome"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(_SUITE):
            item.add_marker(pytest.mark.security)


# -- the tally -------------------------------------------------------------------------------


@dataclass
class Row:
    category: str
    case: str
    expected: str
    observed: str
    verdict: str


_ROWS: dict[str, Row] = {}


@pytest.fixture
def outcome(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """``outcome(expected, observed)``: what the case required and what happened."""

    def note(expected: str, observed: str) -> None:
        request.node.user_properties.append(("expected", expected))
        request.node.user_properties.append(("observed", observed))

    return note


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.nodeid.startswith(_SUITE):
        return
    if report.when != "call" and not (report.failed or report.skipped):
        return
    module, _, name = report.nodeid[len(_SUITE) :].partition("::")
    props = dict(report.user_properties)
    if hasattr(report, "wasxfail"):
        verdict = "xfail (known)" if report.skipped else "XPASS"
    else:
        verdict = {"passed": "safe", "failed": "UNSAFE/FAILED", "skipped": "skipped"}[
            report.outcome
        ]
    _ROWS[report.nodeid] = Row(
        category=module.removeprefix("test_").removesuffix(".py"),
        case=name,
        expected=str(props.get("expected", "")),
        observed=str(props.get("observed", "")),
        verdict=verdict,
    )


def _printable(s: str) -> str:
    """Control characters (attack payloads echo into observations) as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _table(rows: list[Row]) -> list[str]:
    out = [
        "| category | case | expected safe outcome | observed | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in rows:

        def cell(s: str) -> str:
            return _printable(s).replace("|", "\\|")

        out.append(
            f"| {r.category} | `{cell(r.case)}` | {cell(r.expected)} | "
            f"{cell(r.observed)} | {r.verdict} |"
        )
    return out


def _counts(rows: list[Row]) -> list[str]:
    cats: dict[str, dict[str, int]] = {}
    for r in rows:
        cats.setdefault(r.category, {}).setdefault(r.verdict, 0)
        cats[r.category][r.verdict] += 1
    lines = ["| category | cases | outcomes |", "|---|---|---|"]
    total: dict[str, int] = {}
    for cat, verdicts in cats.items():
        n = sum(verdicts.values())
        lines.append(
            f"| {cat} | {n} | " + ", ".join(f"{v} {k}" for k, v in sorted(verdicts.items())) + " |"
        )
        for k, v in verdicts.items():
            total[k] = total.get(k, 0) + v
    lines.append(
        f"| **all** | **{sum(total.values())}** | "
        + ", ".join(f"{v} {k}" for k, v in sorted(total.items()))
        + " |"
    )
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _ROWS:
        return
    rows = sorted(_ROWS.values(), key=lambda r: (r.category, r.case))
    tr = terminalreporter
    tr.section("adversarial suite: cases tried and outcomes")
    for line in _counts(rows):
        tr.write_line(line)
    unsafe = [r for r in rows if r.verdict not in ("safe", "xfail (known)")]
    for r in unsafe:
        tr.write_line(
            _printable(
                f"NOT SAFE: {r.category} {r.case}: expected {r.expected}; observed {r.observed}"
            )
        )
    target = os.environ.get("SECURITY_REPORT")
    if target:
        text = [
            "# Adversarial suite: cases and outcomes",
            "",
            "Generated by `SECURITY_REPORT=docs/security-tests.md pytest tests/security`.",
            "Each case states the safe outcome it requires and what the run observed:",
            "HTTP status and `x-stepup-reason` through the real Envoy, the step-up",
            "completion result from the service's metrics, or the verifier's refusal.",
            "`0` as a status means Envoy closed the connection without an answer.",
            "",
            "## Summary",
            "",
            *_counts(rows),
            "",
            "## Cases",
            "",
            *_table(rows),
            "",
        ]
        Path(target).write_text("\n".join(text))
        tr.write_line(f"wrote {target}")


# -- the stack -------------------------------------------------------------------------------


@dataclass
class IdpKey:
    pem_path: Path
    private_key: rsa.RSAPrivateKey
    kid: str


@pytest.fixture(scope="session")
def idp_key(tmp_path_factory: pytest.TempPathFactory) -> IdpKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("idp-key") / "idp.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return IdpKey(path, key, SigningKey.load_or_generate(path).kid)


@pytest.fixture(scope="session")
def sec_stack(tmp_path_factory: pytest.TempPathFactory, idp_key: IdpKey) -> Iterator[Stack]:
    """The suite's stack; the IdP signs with ``idp_key`` and accepts PUT /_test/misbehave."""
    # Generous deadlines: other suites may load the machine; a fail-closed 403 from a slow
    # Redis or Check is safe but would blur which check refused an attack.
    stack = Stack(
        tmp_path_factory.mktemp("sec-stack"),
        policy_file=POLICY_FILE,
        # Envoy serves the policy's host (trading.example.com), the raw requests' "app.example"
        # and loopback; any other host gets Envoy's 404 (test_paths_headers.py::test_host).
        hosts=(*LOOPBACK_HOSTS, "app.example"),
        idp_signing_key=idp_key.pem_path,
        idp_args=("--test-knobs",),
        extra_settings={"redis": {"deadline_ms": 1000}},
        authz_timeout="2s",
    )
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def minter(sec_stack: Stack, idp_key: IdpKey) -> Minter:
    return Minter(idp_key.private_key, idp_key.kid, sec_stack.idp_url)


@pytest.fixture
async def honest_idp(sec_stack: Stack) -> AsyncIterator[None]:
    """The IdP's knobs are reset before and after the test."""
    await set_knobs(sec_stack)
    yield
    await set_knobs(sec_stack)


@pytest.fixture
async def browser(sec_stack: Stack) -> AsyncIterator[Browser]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        yield Browser(s, sec_stack)


@pytest.fixture
async def make_browser(sec_stack: Stack) -> AsyncIterator[Callable[[], Browser]]:
    """Further independent browsers (each its own cookie jar)."""
    sessions: list[aiohttp.ClientSession] = []

    def factory() -> Browser:
        s = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        sessions.append(s)
        return Browser(s, sec_stack)

    yield factory
    for s in sessions:
        await s.close()
