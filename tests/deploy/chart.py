"""Rendering the Helm chart with Helm's own library (helm-python-sdk), for the deploy tests."""

from __future__ import annotations

import base64
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


# -- a pod's files, as the kubelet would mount them --------------------------------------------


def manifest(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found[0] if found else None


def mount_pod_files(
    docs: list[dict[str, Any]],
    deployment: str,
    container: str,
    root: Path,
    secrets: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Write what ``container`` of ``deployment``'s pod would see under its mount paths, with
    ``root`` in front: each ConfigMap and Secret volume's entries as files (Secrets rendered
    by the chart, else from ``secrets``: name -> {entry: text}, the ones an operator
    creates), subPath mounts as single files, emptyDirs as directories. Returns the
    container spec. A volume the chart names but nobody provides fails here, as the pod
    would fail to start."""
    pod = named(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == container]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for m in c.get("volumeMounts", []):
        vol = volumes[m["name"]]
        target = root / m["mountPath"].lstrip("/")
        entries: dict[str, bytes]
        if "configMap" in vol:
            cm = manifest(docs, "ConfigMap", vol["configMap"]["name"])
            assert cm is not None, f"ConfigMap {vol['configMap']['name']} is not rendered"
            entries = {k: v.encode() for k, v in cm["data"].items()}
        elif "secret" in vol:
            name = vol["secret"]["secretName"]
            secret = manifest(docs, "Secret", name)
            if secret is not None:
                entries = {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}
            else:
                assert secrets is not None and name in secrets, f"no Secret {name}"
                entries = {k: v.encode() for k, v in secrets[name].items()}
            if "items" in vol["secret"]:  # a projection: only these entries, at these paths
                entries = {i["path"]: entries[i["key"]] for i in vol["secret"]["items"]}
        elif "emptyDir" in vol:
            target.mkdir(parents=True, exist_ok=True)
            continue
        else:
            raise AssertionError(f"volume type of {m['name']} not emulated: {vol}")
        if "subPath" in m:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(entries[m["subPath"]])
            continue
        target.mkdir(parents=True, exist_ok=True)
        for key, data in entries.items():
            (target / key).write_bytes(data)
            if "secret" in vol:
                (target / key).chmod(0o440)  # defaultMode; we are the owner here
    return c


def rerooted(doc: Any, root: Path, prefix: str = "/etc/stepup-authz/") -> Any:
    """``doc`` with every string path under ``prefix`` moved under ``root``; nothing else."""
    if isinstance(doc, dict):
        return {k: rerooted(v, root, prefix) for k, v in doc.items()}
    if isinstance(doc, list):
        return [rerooted(v, root, prefix) for v in doc]
    if isinstance(doc, str) and doc.startswith(prefix):
        return str(root / doc.lstrip("/"))
    return doc
