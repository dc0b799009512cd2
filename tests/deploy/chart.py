"""Rendering the Helm chart with Helm's own library (helm-python-sdk), for the deploy tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "k8s" / "stepup-authz"
SIGNING_SECRET = "stepup-authz-audit-signing"
AUDIT_REDIS = "rediss://audit-redis.redis.svc.cluster.local:6380/0"


def raw_values(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "k8s" / "values" / f"{name}.yaml").read_text())
    return doc


def values(name: str) -> dict[str, Any]:
    """A value set from k8s/values/, plus what the audit exporter (on by default) needs when
    the file lacks it: the signing key Secret, and for Sentinel/Cluster a standalone audit
    Redis URL (the exporter reads one URL). test_exporter_refuses_incomplete_values shows
    the chart failing without them."""
    doc = raw_values(name)
    keys = doc.setdefault("secrets", {}).setdefault("auditSigningKey", {})
    keys.setdefault("existingSecret", SIGNING_SECRET)
    if doc["redis"].get("mode", "url") != "url":
        doc.setdefault("audit", {}).setdefault("redisUrl", AUDIT_REDIS)
    return doc


def render(
    chart: Any, vals: dict[str, Any], *, name: str = "stepup-authz", namespace: str = "stepup-authz"
) -> list[dict[str, Any]]:
    """Every manifest the chart renders (offline: ``lookup`` finds nothing)."""
    out = chart.render(vals, name=name, namespace=namespace, is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)
    return kinds


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


SERVICE = "stepup-authz"
EXPORTER = "stepup-authz-audit-exporter"
