"""Make a pack: verify the archive, derive the facts, render, sign.

Refused (``PackError``, nothing written) when an input is missing or malformed, when the
output directory is not empty, and when the archive fails verification, unless
``allow_unverified``: then the pack is made and its first page says, in red, that the
archive failed and where. Files are written to a temporary directory beside ``out`` and
renamed into place last, so a pack directory is either complete and signed or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authz.audit.chain import SigningKey, load_public_keys
from authz.audit.verify import Report, load_anchor
from authz.config.policy_file import LoadedPolicy, read_policy
from authz.errors import ConfigError
from authz.evidence.coverage import check_mesh
from authz.evidence.facts import Period, Pseudonyms, build_facts
from authz.evidence.html import render_html
from authz.evidence.inputs import InputError, read_coverage_result, read_security_report
from authz.evidence.manifest import sign_manifest
from authz.evidence.pdf import render_pdf
from authz.evidence.reading import read_archive
from authz.evidence.report import build_report


class PackError(Exception):
    """A pack could not be made; the message says why and what to give instead."""


class PackRefused(PackError):
    def __init__(self, report: Report) -> None:
        self.report = report
        err = report.error
        super().__init__(
            f"the archive does not verify: {err}. No pack is made from an archive that "
            "fails verification (--allow-unverified makes one that says so on its first page)"
        )


@dataclass
class PackOptions:
    archive: Sequence[Path]
    since_ms: int
    until_ms: int
    out: Path
    signing_key: Path
    pubkeys: Sequence[Path] = ()
    anchor: Path | None = None
    policies: Sequence[Path] = ()
    security_report: Path | None = None
    coverage_result: Path | None = None
    envoy_admin: Sequence[str] = ()
    deadline_ms: int = 150
    exempt_prefixes: Sequence[str] = ("/_stepup/",)
    pseudonymise: bool = False
    pseudonym_key: Path | None = None
    allow_unverified: bool = False
    merge_gap_s: int = 60
    clock: Callable[[], float] = field(default=time.time)


@dataclass(frozen=True)
class PackResult:
    out: Path
    facts: dict[str, Any]
    manifest: dict[str, Any]
    pdf_pages: int


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackError(
            f"{out}: exists and is not an empty directory (a pack is never overwritten)"
        )


def _policies(paths: Sequence[Path]) -> list[LoadedPolicy]:
    out = []
    for p in paths:
        try:
            out.append(read_policy(p))
        except ConfigError as exc:
            raise PackError(f"policy file: {exc}") from exc
    return out


def make_pack(opts: PackOptions) -> PackResult:
    try:
        period = Period(opts.since_ms, opts.until_ms)
    except ValueError as exc:
        raise PackError(str(exc)) from exc
    _check_out(opts.out)
    try:
        key = SigningKey.from_pem_file(opts.signing_key)
    except (OSError, ValueError, TypeError) as exc:
        raise PackError(f"--signing-key {opts.signing_key}: {exc}") from exc
    try:
        keys = load_public_keys(opts.pubkeys)
        anchor = load_anchor(opts.anchor) if opts.anchor else None
    except (OSError, ValueError) as exc:
        raise PackError(f"keys or anchor: {exc}") from exc
    keys.setdefault(key.key_id, key.private_key.public_key())
    policies = _policies(opts.policies)
    try:
        security = read_security_report(opts.security_report) if opts.security_report else None
        coverage = read_coverage_result(opts.coverage_result) if opts.coverage_result else None
    except InputError as exc:
        raise PackError(str(exc)) from exc
    pseud = None
    if opts.pseudonymise:
        try:
            secret = (
                opts.pseudonym_key.read_bytes().strip() if opts.pseudonym_key else os.urandom(32)
            )
            pseud = Pseudonyms(secret)
        except (OSError, ValueError) as exc:
            raise PackError(f"--pseudonym-key: {exc}") from exc
    try:
        view = read_archive(opts.archive, public_keys=keys, anchor=anchor)
    except OSError as exc:
        raise PackError(f"--archive: {exc}") from exc
    if not view.report.ok and not opts.allow_unverified:
        raise PackRefused(view.report)
    if opts.envoy_admin:
        coverage = check_mesh(
            opts.envoy_admin,
            deadline_ms=opts.deadline_ms,
            exempt_prefixes=opts.exempt_prefixes,
            clock=opts.clock,
        ).as_dict()
    now_ms = int(opts.clock() * 1000)
    inputs: dict[str, Any] = {
        "archive": ", ".join(str(p) for p in opts.archive),
        "public key ids": ", ".join(sorted(keys)),
        "anchor": str(opts.anchor) if opts.anchor else "none",
        "policy files": ", ".join(str(p) for p in opts.policies) or "none",
        "adversarial-suite report": str(opts.security_report or "none"),
        "coverage": (
            f"live: {', '.join(opts.envoy_admin)}"
            if opts.envoy_admin
            else str(opts.coverage_result or "none")
        ),
    }
    facts = build_facts(
        view,
        period,
        generated_ms=now_ms,
        policy_files=policies,
        security_suite=security,
        coverage=coverage,
        pseudonyms=pseud,
        allow_unverified=opts.allow_unverified,
        merge_gap_s=opts.merge_gap_s,
        inputs=inputs,
    )
    report = build_report(facts)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.", dir=opts.out.parent))
    try:
        (tmp / "evidence.json").write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
        (tmp / "report.html").write_text(render_html(report), encoding="utf-8")
        pdf, pages = render_pdf(report)
        (tmp / "report.pdf").write_bytes(pdf)
        manifest = sign_manifest(
            tmp,
            key,
            created_ms=now_ms,
            about={
                "period": {"since_ms": period.since_ms, "until_ms": period.until_ms},
                "archive": {
                    "verified": view.report.ok,
                    "last_seq": view.report.last_seq,
                    "last_hash": view.report.last_hash,
                },
            },
        )
        tmp.chmod(0o755)
        if opts.out.exists():
            opts.out.rmdir()  # empty (checked above)
        tmp.rename(opts.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PackResult(opts.out, facts, manifest, pages)
