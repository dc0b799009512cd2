"""Every figure of a pack, derived from the archive's records and the inputs given.

``build_facts`` is pure: records in, one JSON-ready dict out (``evidence.json``); the HTML
and PDF render that dict and nothing else, so the three files state the same facts.
Records are counted generically: an event type this release does not know still appears
under "event types", and a line of an unknown kind under "integrity".

What counts where (the period is ``since <= ts_ms < until``, UTC):

- interactive step-ups: ``stepup.completed`` records without ``via: api``; API grants are
  the ones with ``via: api``, by caller (``actor``);
- failures: records whose ``outcome`` is ``failure``, ``deny`` or ``error``, by type and
  reason; fail-closed intervals: ``error.fail_closed`` records less than ``merge_gap_s``
  apart;
- sensitive accesses: ``access.allowed`` (only allows at or above the audited level are
  recorded at all);
- logouts: types ``logout`` and ``logout.*``; shadow firings: the ``shadow`` field;
- gaps and quarantined records: ``audit.gap`` / ``audit.quarantined`` events, or lines of a
  kind naming a gap or a quarantine, anywhere in the archive (flagged when in the period).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from authz.audit.export import iso_ms
from authz.config.policy_file import LoadedPolicy
from authz.evidence.reading import ArchiveView

FORMAT = "stepup-authz-evidence"
FORMAT_VERSION = 1
MAX_LISTED = 200  # rows of per-record tables (gaps, reloads ...); the totals stay exact
TOP_USERS = 20
DAY_BUCKETS_MAX = 92  # longer periods are bucketed by month
_CHAIN = frozenset({"kind", "seq", "stream_id", "prev_hash", "hash", "v", "event_id"})
_FAILED = frozenset({"failure", "deny", "error"})
_PERSONAL = frozenset({"user", "client_ip", "device", "raw"})


@dataclass(frozen=True)
class Period:
    since_ms: int
    until_ms: int

    def __post_init__(self) -> None:
        if self.until_ms <= self.since_ms:
            raise ValueError("the period is empty: --until must be after --since")

    def contains(self, rec: Mapping[str, Any]) -> bool:
        ts = rec.get("ts_ms")
        return isinstance(ts, int) and self.since_ms <= ts < self.until_ms


class Pseudonyms:
    """Stable pseudonyms for user ids: HMAC-SHA256 under a key (random per pack unless the
    firm keeps one, so that it alone can map a pseudonym back by recomputing)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonym key must be at least 16 bytes")
        self._key = key

    def __call__(self, user: str) -> str:
        return "user-" + hmac.new(self._key, user.encode(), hashlib.sha256).hexdigest()[:16]


def _user(value: Any, pseud: Pseudonyms | None) -> str | None:
    if not isinstance(value, str):
        return None
    return pseud(value) if pseud is not None else value


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class Buckets:
    """Days (or months, for long periods) of the period, UTC."""

    def __init__(self, period: Period) -> None:
        start = datetime.fromtimestamp(period.since_ms / 1000, UTC)
        end = datetime.fromtimestamp((period.until_ms - 1) / 1000, UTC)
        days = (end.date() - start.date()).days + 1
        self.unit = "day" if days <= DAY_BUCKETS_MAX else "month"
        labels: list[str] = []
        d = start.date()
        while d <= end.date():
            label = d.isoformat() if self.unit == "day" else d.isoformat()[:7]
            if not labels or labels[-1] != label:
                labels.append(label)
            d += timedelta(days=1)
        self.labels = labels

    def of(self, ts_ms: int) -> str:
        text = datetime.fromtimestamp(ts_ms / 1000, UTC).date().isoformat()
        return text if self.unit == "day" else text[:7]


def _counts(items: Iterable[tuple[str, ...]], names: Sequence[str]) -> list[dict[str, Any]]:
    c = Counter(items)
    rows = [{**dict(zip(names, k, strict=True)), "count": n} for k, n in c.items()]
    return sorted(rows, key=lambda r: (-r["count"], *(str(r[n]) for n in names)))


def _flat(c: Counter[str]) -> dict[str, int]:
    return {k: c[k] for k in sorted(c, key=lambda k: (-c[k], k))}


def _detail(rec: Mapping[str, Any], pseud: Pseudonyms | None) -> str:
    shown = {
        k: v
        for k, v in rec.items()
        if k not in _CHAIN
        and not k.startswith("_")
        and k not in ("ts_ms", "type")
        and v is not None
        and not (pseud is not None and k in _PERSONAL)
    }
    text = json.dumps(shown, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= 400 else text[:397] + "..."


def _marker(rec: Mapping[str, Any], period: Period, pseud: Pseudonyms | None) -> dict[str, Any]:
    ts = rec.get("ts_ms")
    return {
        "kind": _text(rec.get("kind")),
        "type": _text(rec.get("type")),
        "seq": rec.get("seq") if isinstance(rec.get("seq"), int) else None,
        "ts_ms": ts if isinstance(ts, int) else None,
        "utc": iso_ms(ts) if isinstance(ts, int) else "",
        "segment": _text(rec.get("_segment") or rec.get("segment")),
        "reason": _text(rec.get("reason")),
        "in_period": period.contains(rec),
        "detail": _detail(rec, pseud),
    }


def _is_gap(kind: str, rtype: str) -> bool:
    return rtype.startswith("audit.gap") or (kind != "event" and "gap" in kind)


def _is_quarantine(kind: str, rtype: str) -> bool:
    return rtype.startswith("audit.quarantine") or (kind != "event" and "quarantin" in kind)


def integrity(view: ArchiveView, period: Period, pseud: Pseudonyms | None) -> dict[str, Any]:
    rep = view.report
    kinds: Counter[str] = Counter({"event": len(view.records)})
    kinds["checkpoint"] = len(view.checkpoints)
    gaps: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    malformed: list[dict[str, Any]] = []
    other: list[dict[str, Any]] = []
    for rec in view.others:
        kind = _text(rec.get("kind"))
        kinds[kind or "(none)"] += 1
        row = _marker(rec, period, pseud)
        if _is_gap(kind, ""):
            gaps.append(row)
        elif _is_quarantine(kind, ""):
            quarantined.append(row)
        else:
            other.append(row)
    for rec in view.records:
        rtype = _text(rec.get("type"))
        if _is_gap("event", rtype):
            gaps.append(_marker(rec, period, pseud))
        elif _is_quarantine("event", rtype):
            quarantined.append(_marker(rec, period, pseud))
        elif rtype == "audit.malformed":
            malformed.append(_marker(rec, period, pseud))
    keys: dict[str, dict[str, Any]] = {}
    for cp in view.checkpoints:
        kid = _text(cp.get("key_id"))
        entry = keys.setdefault(kid, {"key_id": kid, "checkpoints": 0, "first_ms": None})
        entry["checkpoints"] += 1
        ts = cp.get("ts_ms")
        if isinstance(ts, int):
            entry["first_ms"] = ts if entry["first_ms"] is None else min(entry["first_ms"], ts)
            entry["last_ms"] = max(entry.get("last_ms") or ts, ts)
    for entry in keys.values():
        entry["first_utc"] = iso_ms(entry["first_ms"]) if entry["first_ms"] is not None else ""
        entry["last_utc"] = iso_ms(entry["last_ms"]) if entry.get("last_ms") is not None else ""
    undated = sum(1 for r in view.records if not isinstance(r.get("ts_ms"), int))

    def listed(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "total": len(rows),
            "in_period": sum(1 for r in rows if r["in_period"]),
            "rows": rows[:MAX_LISTED],
        }

    return {
        "verified": rep.ok,
        "verify": rep.as_dict(),
        "segments": list(view.segments),
        "records_total": len(view.records),
        "records_in_period": sum(1 for r in view.records if period.contains(r)),
        "records_undated": undated,
        "unreadable_lines": view.unreadable,
        "line_kinds": _flat(kinds),
        "checkpoint_keys": sorted(keys.values(), key=lambda e: str(e["key_id"])),
        "gaps": listed(gaps),
        "quarantined": listed(quarantined),
        "malformed": listed(malformed),
        "other_lines": listed(other),
    }


# -- policies -----------------------------------------------------------------------------------


def _route_text(r: Any) -> str:
    where = (
        f"path {r.exact}"
        if r.exact is not None
        else f"prefix {r.prefix}"
        if r.prefix is not None
        else f"regex {r.regex.pattern}"
        if r.regex is not None
        else "any path"
    )
    host = f"{r.host} " if r.host else ""
    methods = f" [{','.join(sorted(r.methods))}]" if r.methods else ""
    return f"{host}{where}{methods}"


def _nets(nets: Iterable[Any]) -> list[str]:
    return [str(n) for n in nets]


def _rule_facts(rule: Any) -> dict[str, Any]:
    conditions: dict[str, Any] = {}
    for name in ("ip_in", "ip_not_in"):
        if getattr(rule, name):
            conditions[name] = _nets(getattr(rule, name))
    for name in ("country_in", "country_not_in", "device", "signals_any", "signals_all"):
        if getattr(rule, name, None):
            conditions[name] = sorted(getattr(rule, name))
    if getattr(rule, "level_at_least", None) is not None:
        conditions["level_at_least"] = rule.level_at_least.name
    action = f"raise_to {rule.raise_to.name}" if rule.raise_to is not None else f"deny {rule.deny}"
    return {
        "name": rule.name,
        "mode": "shadow" if rule.shadow else "enforce",
        "action": action,
        "when": conditions,
    }


def policy_file_facts(loaded: LoadedPolicy) -> dict[str, Any]:
    p = loaded.policy
    levels = []
    for lv in p.levels:
        bind = [b for b, on in (("device", lv.bind_device), ("ip", lv.bind_ip)) if on]
        levels.append(
            {
                "name": lv.name,
                "rank": lv.rank,
                "public": lv.public,
                "acr": sorted(lv.acr),
                "amr_any": sorted(lv.amr_any),
                "factors": sorted(getattr(lv, "factors", ()) or ()),
                "max_age": lv.max_age,
                "grant_ttl": lv.grant_ttl,
                "bind": bind,
                "ip_allow": _nets(lv.ip_allow),
                "ip_deny": _nets(lv.ip_deny),
            }
        )
    routes: dict[str, list[str]] = {lv.name: [] for lv in p.levels}
    for r in p.routes:
        routes[r.level.name].append(_route_text(r))
    routes[p.default_level.name].append("(default: every other request)")
    return {
        "path": str(loaded.path),
        "sha256": loaded.sha256,
        "version": loaded.version,
        "default_level": p.default_level.name,
        "levels": levels,
        "routes_by_level": routes,
        "rules": [_rule_facts(r) for r in p.rules],
    }


def policies(view: ArchiveView, period: Period, files: Sequence[LoadedPolicy]) -> dict[str, Any]:
    reloads = []
    before: dict[str, Any] | None = None
    for rec in view.records:
        if rec.get("type") != "policy.reload" or not isinstance(rec.get("ts_ms"), int):
            continue
        row = {
            "ts_ms": rec["ts_ms"],
            "utc": iso_ms(rec["ts_ms"]),
            "seq": rec.get("seq"),
            "outcome": _text(rec.get("outcome")),
            "version": _text(rec.get("policy_version")),
            "old_sha256": _text(rec.get("old_sha256")),
            "new_sha256": _text(rec.get("new_sha256")),
            "error": _text(rec.get("error")),
            "in_period": period.contains(rec),
        }
        if rec["ts_ms"] < period.since_ms and row["outcome"] == "success":
            before = row
        if row["in_period"]:
            reloads.append(row)
    seen: dict[str, dict[str, Any]] = {}
    for rec in view.records:
        version = rec.get("policy_version")
        if not isinstance(version, str) or not period.contains(rec):
            continue
        if rec.get("type") == "policy.reload":
            continue
        e = seen.setdefault(version, {"version": version, "decisions": 0, "first_ms": rec["ts_ms"]})
        e["decisions"] += 1
        e["first_ms"] = min(e["first_ms"], rec["ts_ms"])
        e["last_ms"] = max(e.get("last_ms", rec["ts_ms"]), rec["ts_ms"])
    versions = sorted(seen.values(), key=lambda e: (e["first_ms"], e["version"]))
    for e in versions:
        e["first_utc"], e["last_utc"] = iso_ms(e["first_ms"]), iso_ms(e["last_ms"])
    if before is not None:
        at_start = {"source": "reload", **before}
    elif versions:
        at_start = {"source": "decisions", "version": versions[0]["version"]}
    else:
        at_start = None
    reload_shas = {r["new_sha256"] for r in reloads} | ({before["new_sha256"]} if before else set())
    facts_files = []
    for loaded in files:
        f = policy_file_facts(loaded)
        f["tied_by"] = (
            "reload record (sha256)"
            if loaded.sha256 in reload_shas
            else "decisions (version)"
            if loaded.version in seen
            else "not seen in the archive"
        )
        facts_files.append(f)
    return {
        "in_force_at_start": at_start,
        "reloads": reloads[:MAX_LISTED],
        "reloads_total": len(reloads),
        "reload_outcomes": _flat(Counter(r["outcome"] for r in reloads)),
        "versions_seen": versions,
        "files": facts_files,
    }


# -- decisions ----------------------------------------------------------------------------------


def fail_closed_intervals(
    recs: Sequence[Mapping[str, Any]], merge_gap_s: int
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rec in sorted(recs, key=lambda r: int(r["ts_ms"])):
        ts = int(rec["ts_ms"])
        reason = _text(rec.get("reason")) or "(none)"
        if out and ts - out[-1]["end_ms"] <= merge_gap_s * 1000:
            cur = out[-1]
            cur["end_ms"] = ts
            cur["count"] += 1
            cur["reasons"][reason] = cur["reasons"].get(reason, 0) + 1
        else:
            out.append({"start_ms": ts, "end_ms": ts, "count": 1, "reasons": {reason: 1}})
    for cur in out:
        cur["start_utc"], cur["end_utc"] = iso_ms(cur["start_ms"]), iso_ms(cur["end_ms"])
        cur["duration_s"] = (cur["end_ms"] - cur["start_ms"]) // 1000
    return out


def build_facts(
    view: ArchiveView,
    period: Period,
    *,
    generated_ms: int,
    policy_files: Sequence[LoadedPolicy] = (),
    security_suite: Mapping[str, Any] | None = None,
    coverage: Mapping[str, Any] | None = None,
    pseudonyms: Pseudonyms | None = None,
    allow_unverified: bool = False,
    merge_gap_s: int = 60,
    inputs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    pseud = pseudonyms
    buckets = Buckets(period)
    recs = [r for r in view.records if period.contains(r)]
    by_type: Counter[str] = Counter(_text(r.get("type")) or "(none)" for r in recs)

    def of_type(t: str) -> list[dict[str, Any]]:
        return [r for r in recs if r.get("type") == t]

    # step-ups
    challenges = of_type("stepup.challenge")
    completed = of_type("stepup.completed")
    # A refused step-up is its own record (stepup.failed); older archives hold it as a
    # stepup.completed with outcome failure. Both count as failures here.
    interactive = [r for r in completed if r.get("via") != "api"] + of_type("stepup.failed")
    api_grants = [r for r in completed if r.get("via") == "api"]
    per_bucket: dict[str, dict[str, int]] = {
        b: {"challenges": 0, "success": 0, "failure": 0} for b in buckets.labels
    }
    for r in challenges:
        per_bucket[buckets.of(r["ts_ms"])]["challenges"] += 1
    for r in interactive:
        key = "success" if r.get("outcome") == "success" else "failure"
        per_bucket[buckets.of(r["ts_ms"])][key] += 1
    stepup_types: dict[str, Counter[str]] = defaultdict(Counter)
    for r in recs:
        t = _text(r.get("type"))
        if t.startswith("stepup."):
            stepup_types[t][_text(r.get("level")) or "(none)"] += 1
    stepup_failed_users = Counter(
        u
        for r in interactive
        if r.get("outcome") != "success" and (u := _user(r.get("user"), pseud)) is not None
    )

    # failures
    failed = [r for r in recs if r.get("outcome") in _FAILED]
    fail_closed = of_type("error.fail_closed")

    # sensitive accesses
    allowed = of_type("access.allowed")
    allowed_per_bucket: dict[str, Counter[str]] = {b: Counter() for b in buckets.labels}
    for r in allowed:
        allowed_per_bucket[buckets.of(r["ts_ms"])][_text(r.get("level")) or "(none)"] += 1

    # API callers
    revoked = of_type("grant.revoked")
    revocations: dict[str, dict[str, Any]] = {}
    for r in revoked:
        actor = _text(r.get("actor")) or "(unknown)"
        e = revocations.setdefault(actor, {"caller": actor, "records": 0, "revoked": 0})
        e["records"] += 1
        n = r.get("revoked")
        e["revoked"] += n if isinstance(n, int) and not isinstance(n, bool) else 0
    other_calls = [
        r
        for r in recs
        if r.get("actor") is not None and r.get("type") not in ("stepup.completed", "grant.revoked")
    ]

    # logouts
    logouts = [r for r in recs if _text(r.get("type")).split(".")[0] == "logout"]
    logout_bucket: dict[str, int] = dict.fromkeys(buckets.labels, 0)
    for r in logouts:
        logout_bucket[buckets.of(r["ts_ms"])] += 1

    # shadow rules: in force (policy files) and how often they would have fired (records)
    fired: Counter[str] = Counter(
        name.strip()
        for r in recs
        if isinstance(r.get("shadow"), str)
        for name in r["shadow"].split(",")
        if name.strip()
    )
    shadow: dict[str, dict[str, Any]] = {}
    for loaded in policy_files:
        for rule in loaded.policy.rules:
            if rule.shadow:
                e = shadow.setdefault(
                    rule.name,
                    {"name": rule.name, "action": _rule_facts(rule)["action"], "policies": []},
                )
                e["policies"].append(loaded.version)
    for name in fired:
        shadow.setdefault(name, {"name": name, "action": "(not in the policy files given)"})
    for name, e in shadow.items():
        e["fired"] = fired[name]
        e.setdefault("policies", [])

    users = {r.get("user") for r in recs if isinstance(r.get("user"), str)}
    sessions = {r.get("session") for r in recs if isinstance(r.get("session"), str)}
    integ = integrity(view, period, pseud)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "generated_ms": generated_ms,
        "generated_utc": iso_ms(generated_ms),
        "period": {
            "since_ms": period.since_ms,
            "until_ms": period.until_ms,
            "since_utc": iso_ms(period.since_ms),
            "until_utc": iso_ms(period.until_ms),
            "bucket": buckets.unit,
            "buckets": buckets.labels,
        },
        "unverified": not integ["verified"],
        "allow_unverified": allow_unverified,
        "pseudonymised": pseud is not None,
        "inputs": dict(inputs or {}),
        "integrity": integ,
        "summary": {
            "records": len(recs),
            "users": len(users),
            "sessions": len(sessions),
            "stepup_challenges": len(challenges),
            "stepups_succeeded": sum(1 for r in interactive if r.get("outcome") == "success"),
            "stepups_failed": sum(1 for r in interactive if r.get("outcome") != "success"),
            "sensitive_accesses": len(allowed),
            "fail_closed": len(fail_closed),
            "api_grants": len(api_grants),
            "revocations": len(revoked),
            "logouts": len(logouts),
            "policy_reloads": sum(1 for r in of_type("policy.reload")),
        },
        "event_types": _flat(by_type),
        "policies": policies(view, period, policy_files),
        "stepups": {
            "challenges_by_level": _flat(
                Counter(_text(r.get("level")) or "(none)" for r in challenges)
            ),
            "completions_by_outcome": _flat(
                Counter(_text(r.get("outcome")) or "(none)" for r in interactive)
            ),
            "completions_by_factor": _flat(
                Counter(_text(r.get("factor")) or "(none)" for r in interactive)
            ),
            "by_level_factor_outcome": _counts(
                (
                    (
                        _text(r.get("level")) or "(none)",
                        _text(r.get("factor")) or "(none)",
                        _text(r.get("outcome")) or "(none)",
                    )
                    for r in interactive
                ),
                ("level", "factor", "outcome"),
            ),
            "per_bucket": [{"bucket": b, **per_bucket[b]} for b in buckets.labels],
            "types_by_level": {t: _flat(c) for t, c in sorted(stepup_types.items())},
            "failed_by_user": [
                {"user": u, "count": n} for u, n in stepup_failed_users.most_common(TOP_USERS)
            ],
        },
        "failures": {
            "total": len(failed),
            "by_type_reason": _counts(
                ((_text(r.get("type")), _text(r.get("reason")) or "(none)") for r in failed),
                ("type", "reason"),
            ),
            "by_reason": _flat(Counter(_text(r.get("reason")) or "(none)" for r in failed)),
        },
        "fail_closed": {
            "total": len(fail_closed),
            "by_reason": _flat(Counter(_text(r.get("reason")) or "(none)" for r in fail_closed)),
            "merge_gap_s": merge_gap_s,
            "intervals": fail_closed_intervals(fail_closed, merge_gap_s),
        },
        "sensitive_access": {
            "total": len(allowed),
            "by_level": _flat(Counter(_text(r.get("level")) or "(none)" for r in allowed)),
            "by_level_source": _counts(
                (
                    (
                        _text(r.get("level")) or "(none)",
                        _text(r.get("evidence_source")) or "(none)",
                    )
                    for r in allowed
                ),
                ("level", "evidence_source"),
            ),
            "per_bucket": [
                {"bucket": b, "by_level": dict(allowed_per_bucket[b])} for b in buckets.labels
            ],
        },
        "api": {
            "grants_by_caller": _counts(
                (
                    (
                        _text(r.get("actor")) or "(unknown)",
                        _text(r.get("level")) or "(none)",
                        _text(r.get("outcome")) or "(none)",
                    )
                    for r in api_grants
                ),
                ("caller", "level", "outcome"),
            ),
            "revocations_by_caller": sorted(
                revocations.values(), key=lambda e: (-e["records"], e["caller"])
            ),
            "other_calls_by_caller": _counts(
                ((_text(r.get("actor")), _text(r.get("type"))) for r in other_calls),
                ("caller", "type"),
            ),
        },
        "logouts": {
            "total": len(logouts),
            "by_type": _flat(Counter(_text(r.get("type")) for r in logouts)),
            "per_bucket": [{"bucket": b, "count": logout_bucket[b]} for b in buckets.labels],
        },
        "shadow": {
            "total_firings": sum(fired.values()),
            "rules": sorted(shadow.values(), key=lambda e: (-e["fired"], e["name"])),
        },
        "coverage": dict(coverage) if coverage is not None else None,
        "security_suite": dict(security_suite) if security_suite is not None else None,
    }
