"""The chart's scheduled audit jobs (daily `audit verify`, a periodic evidence pack): off by
default; when on, valid for Kubernetes, runnable by the real CLI parser, and mounted on the
exporter's archive and keys exactly where their arguments point."""

from __future__ import annotations

import copy
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from authz.audit.chain import SigningKey
from authz.cli import build_parser
from tests.deploy.chart import CHART, EXPORTER, SIGNING_SECRET, named, render, values
from tests.deploy.test_helm_chart import KUBE_VERSIONS, VALUE_SETS

pytestmark = pytest.mark.deploy

PUB = SigningKey.generate().public_pem().decode()


def jobs_on(value_set: str = "url", **evidence: Any) -> dict[str, Any]:
    vals = copy.deepcopy(values(value_set))
    vals["auditJobs"] = {
        "publicKeys": {"audit-signing.pub.pem": PUB},
        "verify": {"enabled": True},
        "evidence": {"enabled": True, **evidence},
    }
    return vals


def cronjobs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"].rsplit("-", 1)[-1]: d for d in docs if d["kind"] == "CronJob"}


def pod(cj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return spec


def test_off_by_default(chart: Any) -> None:
    docs = render(chart, values("minimal"))
    assert not cronjobs(docs)
    assert not [d for d in docs if d["metadata"]["name"].endswith("-jobs")]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_jobs_render_and_validate(chart: Any, value_set: str) -> None:
    vals = jobs_on(value_set, envoyAdminUrls=["http://edge.mesh:9901"])
    report = helm.lint(CHART, vals, strict=True, kube_version="v1.31.0")
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2]
    docs = render(chart, vals)
    cjs = cronjobs(docs)
    assert sorted(cjs) == ["evidence", "verify"]
    for doc in docs:
        if doc["kind"] in ("CronJob", "ConfigMap", "NetworkPolicy"):
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)


def test_job_arguments_parse_with_the_real_cli_and_point_at_the_mounts(chart: Any) -> None:
    docs = render(chart, jobs_on(envoyAdminUrls=["http://edge.mesh:9901"]))
    cjs = cronjobs(docs)
    exporter = named(docs, "Deployment", EXPORTER)["spec"]["template"]["spec"]
    (xc,) = exporter["containers"]
    archive_mount = next(m for m in xc["volumeMounts"] if m["name"] == "archive")
    for name, cj in cjs.items():
        p = pod(cj)
        (c,) = p["containers"]
        args = build_parser().parse_args(c["args"])
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in p["volumes"]}
        # the exporter's claim, at the exporter's path, on the exporter's node
        am = mounts[archive_mount["mountPath"]]
        assert (
            vols[am["name"]]["persistentVolumeClaim"]["claimName"]
            == (
                next(v for v in exporter["volumes"] if v["name"] == "archive")[
                    "persistentVolumeClaim"
                ]["claimName"]
            )
        )
        term = p["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
        labels = named(docs, "Deployment", EXPORTER)["spec"]["template"]["metadata"]["labels"]
        assert term["labelSelector"]["matchLabels"].items() <= labels.items()
        assert p["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        keys = args.pubkey
        assert [str(k) for k in keys] == ["/etc/stepup-authz/audit-pubkeys/audit-signing.pub.pem"]
        assert mounts["/etc/stepup-authz/audit-pubkeys"]["readOnly"] is True
        if name == "verify":
            assert args.func.__name__ == "_cmd_verify"
            assert [str(x) for x in args.paths] == ["/var/lib/stepup-authz/audit/archive"]
            assert am["readOnly"] is True and vols["archive"]["persistentVolumeClaim"]["readOnly"]
        else:
            assert args.func.__name__ == "_cmd_evidence" and args.evidence_command is None
            assert [str(x) for x in args.archive] == ["/var/lib/stepup-authz/audit/archive"]
            assert args.last == 7 and str(args.out).startswith("/var/lib/stepup-authz/audit/")
            assert not am.get("readOnly")
            key_dir = str(args.signing_key.parent)
            assert vols[mounts[key_dir]["name"]]["secret"]["secretName"] == SIGNING_SECRET
            assert vols[mounts["/etc/stepup-authz/policy"]["name"]]["configMap"]["name"].endswith(
                "-policy"
            )
            assert str(args.policy[0]) == "/etc/stepup-authz/policy/policy.yaml"
            assert str(args.config) == mounts["/etc/stepup-authz/config.yaml"]["mountPath"]
            assert args.envoy_admin == ["http://edge.mesh:9901"]
    cm = next(
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-audit-pubkeys")
    )
    assert cm["data"]["audit-signing.pub.pem"].strip() == PUB.strip()
    pol = next(
        d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-jobs")
    )
    assert pol["spec"]["ingress"] == []
    ports = {p["port"] for r in pol["spec"]["egress"] for p in r["ports"]}
    assert ports == {53, 9901}


def test_jobs_refuse_incomplete_values(chart: Any) -> None:
    vals = jobs_on()
    vals["auditJobs"]["publicKeys"] = {}
    with pytest.raises(helm.HelmError, match="checkpoint public key"):
        chart.render(vals, name="x", namespace="x")
    vals = jobs_on()
    vals["auditExporter"] = {"persistence": {"accessModes": ["ReadWriteOncePod"]}}
    with pytest.raises(helm.HelmError, match="ReadWriteOncePod"):
        chart.render(vals, name="x", namespace="x")
    vals = jobs_on()
    vals["auditJobs"]["evidence"]["schedule"] = "daily"
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(vals)
