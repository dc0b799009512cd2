"""The report's content, once: a list of blocks (headings, figures, tables, charts) built
from the facts. ``html`` and ``pdf`` only lay these blocks out, so both files say the same
thing in the same order, and neither computes a figure of its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from authz.evidence import charts


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str
    muted: bool = False


@dataclass(frozen=True)
class Banner:
    text: str
    ok: bool


@dataclass(frozen=True)
class Figures:
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    empty: str = "none in the period"


@dataclass(frozen=True)
class Chart:
    chart_id: str
    svg: str


@dataclass(frozen=True)
class PageBreak:
    pass


Block = Heading | Para | Banner | Figures | Table | Chart | PageBreak


@dataclass
class Report:
    title: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def charts(self) -> list[Chart]:
        return [b for b in self.blocks if isinstance(b, Chart)]


def _s(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, list | tuple):
        return ", ".join(_s(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return str(v)


def _table(rows: Sequence[Mapping[str, Any]], cols: Sequence[tuple[str, str]], **kw: Any) -> Table:
    return Table(
        tuple(label for label, _ in cols),
        tuple(tuple(_s(r.get(key)) for _, key in cols) for r in rows),
        **kw,
    )


def _dict_table(d: Mapping[str, Any], k: str, v: str) -> Table:
    return Table((k, v), tuple((str(a), _s(b)) for a, b in d.items()))


def _integrity_text(facts: Mapping[str, Any]) -> Banner:
    integ = facts["integrity"]
    ver = integ["verify"]
    if not integ["verified"]:
        err = ver.get("error") or {}
        where = f"{err.get('segment', '')}:{err.get('line', '')}"
        return Banner(
            "UNVERIFIED: the archive FAILED verification and this pack was made with "
            f"--allow-unverified. First broken link: {err.get('kind', '?')} at {where}: "
            f"{err.get('detail', '')}. No figure below can be relied on as complete.",
            ok=False,
        )
    sig = "signatures checked" if ver.get("signatures_checked") else "signatures NOT checked"
    torn = (
        " A torn last line (a crash mid-write) was found; all before it verifies."
        if ver.get("torn")
        else ""
    )
    return Banner(
        f"The archive verifies: {ver['records']} records in {ver['segments']} segments, "
        f"hash chain and sequence intact, {ver['checkpoints']} checkpoints, {sig}, signed "
        f"through seq {ver['signed_through']} of {ver['last_seq']}.{torn}",
        ok=True,
    )


def build_report(facts: Mapping[str, Any]) -> Report:
    p = facts["period"]
    rep = Report(f"Step-up authentication evidence, {p['since_utc'][:10]} to {p['until_utc'][:10]}")
    b = rep.blocks
    s = facts["summary"]
    integ = facts["integrity"]
    b.append(Banner(_integrity_text(facts).text, _integrity_text(facts).ok))
    b.append(
        Figures(
            (
                ("period (UTC)", f"{p['since_utc']} to {p['until_utc']} (until exclusive)"),
                ("generated", facts["generated_utc"]),
                ("records in the period", str(s["records"])),
                ("users / sessions", f"{s['users']} / {s['sessions']}"),
                ("step-up challenges", str(s["stepup_challenges"])),
                (
                    "step-ups succeeded / failed",
                    f"{s['stepups_succeeded']} / {s['stepups_failed']}",
                ),
                ("sensitive accesses", str(s["sensitive_accesses"])),
                ("fail-closed denials", str(s["fail_closed"])),
                ("API grants / revocations", f"{s['api_grants']} / {s['revocations']}"),
                ("logouts", str(s["logouts"])),
                ("policy reloads", str(s["policy_reloads"])),
                (
                    "gaps / quarantined records",
                    f"{integ['gaps']['total']} / {integ['quarantined']['total']}",
                ),
                ("users shown as", "pseudonyms" if facts["pseudonymised"] else "ids"),
            )
        )
    )
    cov = facts.get("coverage")
    if cov is not None:
        b.append(
            Banner(
                f"Mesh coverage ({cov.get('checked_utc', '')}): "
                f"{cov.get('routes_total', 0)} routes on "
                f"{len(cov.get('envoys', []))} Envoy(s); {cov.get('uncovered', 0)} uncovered, "
                f"{cov.get('fail_open', 0)} fail open, {len(cov.get('errors', []))} unreachable.",
                ok=bool(cov.get("ok")),
            )
        )
    b.append(
        Para(
            "Every figure is counted from the audit archive's records for the period and "
            "from the input files named below; none is typed in. evidence.json holds the "
            "same facts; manifest.json signs the hashes of all three files "
            "(stepup-authz evidence verify).",
            muted=True,
        )
    )
    inputs = facts.get("inputs") or {}
    if inputs:
        b.append(_dict_table(inputs, "input", "value"))

    # -- integrity
    b.append(Heading("1. Integrity of the record"))
    ver = integ["verify"]
    b.append(
        Figures(
            (
                ("verify result", "OK" if integ["verified"] else "FAILED"),
                ("segments", str(ver["segments"])),
                ("records (whole archive)", str(integ["records_total"])),
                ("first / last seq", f"{ver['first_seq']} / {ver['last_seq']}"),
                ("last hash", str(ver["last_hash"])),
                ("signed through seq", str(ver["signed_through"])),
                ("first broken link", _s(ver.get("error")) or "none"),
                ("torn last line", _s(ver.get("torn")) or "none"),
                ("notes", "; ".join(ver.get("notes") or []) or "none"),
                (
                    "undated records / unreadable lines",
                    f"{integ['records_undated']} / {integ['unreadable_lines']}",
                ),
            )
        )
    )
    b.append(Heading("Checkpoint signing keys", 3))
    b.append(
        _table(
            integ["checkpoint_keys"],
            [
                ("key id", "key_id"),
                ("checkpoints", "checkpoints"),
                ("first", "first_utc"),
                ("last", "last_utc"),
            ],
            empty="no checkpoints",
        )
    )
    b.append(Heading("Line kinds", 3))
    b.append(_dict_table(integ["line_kinds"], "kind", "lines"))
    for key, title in (
        ("gaps", "Gaps"),
        ("quarantined", "Quarantined records"),
        ("malformed", "Malformed stream entries"),
        ("other_lines", "Lines of other kinds"),
    ):
        part = integ[key]
        b.append(Heading(f"{title}: {part['total']} ({part['in_period']} in the period)", 3))
        if part["total"]:
            b.append(
                _table(
                    part["rows"],
                    [
                        ("seq", "seq"),
                        ("time", "utc"),
                        ("kind", "kind"),
                        ("type", "type"),
                        ("reason", "reason"),
                        ("detail", "detail"),
                    ],
                )
            )

    # -- policies
    pol = facts["policies"]
    b.append(Heading("2. Policies in force"))
    start = pol["in_force_at_start"]
    b.append(
        Para(
            "In force at the start of the period: "
            + (
                f"version {start.get('version')} (sha256 {start.get('new_sha256', '')[:16]}, "
                f"loaded {start.get('utc')})"
                if start and start.get("source") == "reload"
                else f"version {start['version']} (named by the first decision; "
                "no reload record before the period)"
                if start
                else "unknown (no reload record and no decision before or in the period)"
            )
        )
    )
    b.append(Heading("Reloads in the period", 3))
    b.append(
        _table(
            pol["reloads"],
            [
                ("time", "utc"),
                ("outcome", "outcome"),
                ("version", "version"),
                ("new sha256", "new_sha256"),
                ("error", "error"),
            ],
        )
    )
    b.append(Heading("Versions named by decisions", 3))
    b.append(
        _table(
            pol["versions_seen"],
            [
                ("version", "version"),
                ("decisions", "decisions"),
                ("first", "first_utc"),
                ("last", "last_utc"),
            ],
        )
    )
    for f in pol["files"]:
        b.append(Heading(f"Policy file {f['path']} (version {f['version']})", 3))
        b.append(Para(f"sha256 {f['sha256']}; tied to the archive by: {f['tied_by']}", muted=True))
        b.append(
            _table(
                f["levels"],
                [
                    ("level", "name"),
                    ("public", "public"),
                    ("acr", "acr"),
                    ("amr any", "amr_any"),
                    ("max age s", "max_age"),
                    ("bind", "bind"),
                    ("factors", "factors"),
                ],
            )
        )
        b.append(
            Table(
                ("level", "routes"),
                tuple((lv, "; ".join(rs) or "(none)") for lv, rs in f["routes_by_level"].items()),
            )
        )
        if f["rules"]:
            b.append(
                _table(
                    f["rules"],
                    [("rule", "name"), ("mode", "mode"), ("action", "action"), ("when", "when")],
                )
            )
    if not pol["files"]:
        b.append(
            Para(
                "No policy file was given (--policy): levels and routes are not listed.", muted=True
            )
        )

    # -- step-ups
    st = facts["stepups"]
    b.append(Heading("3. Step-ups"))
    buckets = [r["bucket"] for r in st["per_bucket"]]
    b.append(
        Chart(
            "stepups-per-bucket",
            charts.stacked_columns(
                "stepups-per-bucket",
                f"Step-up completions per {p['bucket']}",
                buckets,
                [
                    ("success", [r["success"] for r in st["per_bucket"]]),
                    ("failure", [r["failure"] for r in st["per_bucket"]]),
                ],
            ),
        )
    )
    b.append(
        Chart(
            "stepups-by-factor",
            charts.bar_chart(
                "stepups-by-factor",
                "Step-up completions by factor",
                list(st["completions_by_factor"].items()),
            ),
        )
    )
    b.append(Heading("By level, factor and outcome", 3))
    b.append(
        _table(
            st["by_level_factor_outcome"],
            [("level", "level"), ("factor", "factor"), ("outcome", "outcome"), ("count", "count")],
        )
    )
    b.append(Heading("Per " + p["bucket"], 3))
    b.append(
        _table(
            st["per_bucket"],
            [
                (p["bucket"], "bucket"),
                ("challenges", "challenges"),
                ("succeeded", "success"),
                ("failed", "failure"),
            ],
        )
    )
    b.append(Heading("Challenges by level", 3))
    b.append(_dict_table(st["challenges_by_level"], "level", "challenges"))
    if st["types_by_level"]:
        b.append(Heading("Step-up records by type and level", 3))
        b.append(
            Table(("type", "by level"), tuple((t, _s(c)) for t, c in st["types_by_level"].items()))
        )
    b.append(Heading("Users with failed step-ups", 3))
    b.append(_table(st["failed_by_user"], [("user", "user"), ("failed", "count")]))

    # -- failures
    fl = facts["failures"]
    b.append(Heading("4. Failures and fail-closed intervals"))
    b.append(
        Chart(
            "failures-by-reason",
            charts.bar_chart(
                "failures-by-reason",
                "Failures, denials and errors by reason",
                list(fl["by_reason"].items()),
            ),
        )
    )
    b.append(
        _table(fl["by_type_reason"], [("type", "type"), ("reason", "reason"), ("count", "count")])
    )
    fc = facts["fail_closed"]
    b.append(
        Chart(
            "fail-closed-timeline",
            charts.timeline(
                "fail-closed-timeline",
                f"Fail-closed intervals ({fc['total']} denials)",
                p["since_ms"],
                p["until_ms"],
                [(i["start_ms"], i["end_ms"]) for i in fc["intervals"]],
            ),
        )
    )
    b.append(
        Para(
            f"An interval groups fail-closed denials less than {fc['merge_gap_s']} s apart. "
            "Each was a request refused because a dependency failed: never an allow.",
            muted=True,
        )
    )
    b.append(
        _table(
            fc["intervals"],
            [
                ("start", "start_utc"),
                ("end", "end_utc"),
                ("seconds", "duration_s"),
                ("denials", "count"),
                ("reasons", "reasons"),
            ],
        )
    )

    # -- sensitive access
    sa = facts["sensitive_access"]
    b.append(Heading("5. Sensitive accesses"))
    b.append(
        Chart(
            "sensitive-by-level",
            charts.bar_chart(
                "sensitive-by-level", "Audited allows by level", list(sa["by_level"].items())
            ),
        )
    )
    b.append(
        _table(
            sa["by_level_source"],
            [("level", "level"), ("evidence", "evidence_source"), ("allows", "count")],
        )
    )

    # -- API, logouts
    api = facts["api"]
    b.append(Heading("6. API grants, revocations and logouts"))
    b.append(Heading("Grants recorded through the Sessions API, by caller", 3))
    b.append(
        _table(
            api["grants_by_caller"],
            [("caller", "caller"), ("level", "level"), ("outcome", "outcome"), ("count", "count")],
        )
    )
    b.append(Heading("Revocations by caller", 3))
    b.append(
        _table(
            api["revocations_by_caller"],
            [("caller", "caller"), ("records", "records"), ("sessions revoked", "revoked")],
        )
    )
    if api["other_calls_by_caller"]:
        b.append(Heading("Other calls by caller", 3))
        b.append(
            _table(
                api["other_calls_by_caller"],
                [("caller", "caller"), ("type", "type"), ("count", "count")],
            )
        )
    lo = facts["logouts"]
    b.append(Heading(f"Logouts: {lo['total']}", 3))
    b.append(_dict_table(lo["by_type"], "type", "count"))

    # -- shadow rules
    sh = facts["shadow"]
    b.append(Heading("7. Shadow rules"))
    b.append(
        Para(
            "Shadow rules are evaluated and recorded, never enforced: what they would have done.",
            muted=True,
        )
    )
    b.append(
        _table(
            sh["rules"],
            [
                ("rule", "name"),
                ("would", "action"),
                ("in policy versions", "policies"),
                ("would have fired", "fired"),
            ],
            empty="no shadow rules",
        )
    )

    # -- coverage
    b.append(Heading("8. Coverage of the mesh"))
    if cov is None:
        b.append(Para("No coverage result was given (--coverage or --envoy-admin).", muted=True))
    else:
        b.append(
            _table(
                cov.get("routes", []),
                [
                    ("envoy", "envoy"),
                    ("listener", "listener"),
                    ("virtual host", "virtual_host"),
                    ("route", "route"),
                    ("status", "status"),
                    ("fail open", "failure_mode_allow"),
                    ("timeout ms", "timeout_ms"),
                    ("on error", "status_on_error"),
                    ("why", "reason"),
                ],
                empty="no routes",
            )
        )
        if cov.get("errors"):
            b.append(_table(cov["errors"], [("envoy", "envoy"), ("error", "error")]))

    # -- adversarial suite
    b.append(Heading("9. Adversarial suite"))
    sec = facts.get("security_suite")
    if sec is None:
        b.append(Para("No adversarial-suite report was given (--security-report).", muted=True))
    else:
        b.append(
            Para(
                f"{sec['path']} (sha256 {sec['sha256'][:16]}): {sec['total_cases']} cases; "
                f"verdicts {_s(sec['verdicts'])}."
            )
        )
        b.append(
            _table(
                sec["categories"],
                [("category", "category"), ("cases", "cases"), ("outcomes", "outcomes")],
            )
        )
        if sec["not_safe"]:
            b.append(Heading("Cases not safe", 3))
            b.append(
                _table(
                    sec["not_safe"],
                    [
                        ("category", "category"),
                        ("case", "case"),
                        ("observed", "observed"),
                        ("verdict", "verdict"),
                    ],
                )
            )

    # -- all event types
    b.append(Heading("10. Every event type in the period"))
    b.append(
        Chart(
            "event-types",
            charts.bar_chart("event-types", "Records by type", list(facts["event_types"].items())),
        )
    )
    b.append(_dict_table(facts["event_types"], "type", "records"))
    return rep
