"""The Envoy Gateway manifests against what the service needs (issue 14, item 9).

The attacker's story: the gateway drops a header the service reads (the device assertion:
every device "absent"; X-Forwarded-For: the wrong client), hides client-sent x-stepup-*
from the check (so the service cannot strip them on a public route and the forged identity
reaches the upstream), or sends a sensitive rule at the default level. The operator's: a
10 s default timeout holding every request on a slow store; trusted hops that disagree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.audit.config import AuditSettings
from authz.config.policy_file import read_policy
from authz.config.settings import RedisSettings
from authz.render import EXT_AUTHZ, contract, peer_address_filter, render_envoy
from tests.deploy.chart import ROOT, named, render, values
from tests.deploy.test_envoy_configs import assert_valid
from tests.deploy.test_istio import without_peer_filter

pytestmark = pytest.mark.deploy

EG = ROOT / "k8s" / "envoy-gateway"
POLICY = read_policy(ROOT / "examples" / "policy.yaml").policy  # the manifests' policy


def _docs() -> list[dict[str, Any]]:
    return [d for p in sorted(EG.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _docs() if d["kind"] == kind]


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(ms|s|m)", text)
    assert m is not None, text
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(2)]


def _sent_to_check(ext_auth: dict[str, Any], header: str) -> bool:
    """Whether the gateway sends request header ``header`` to the check. Without
    headersToExtAuth, EG sends every header to a gRPC service and only a few to HTTP."""
    listed = ext_auth.get("headersToExtAuth")
    if listed is None:
        return "grpc" in ext_auth or header in ("authorization", "host")
    return header in {h.lower() for h in listed}


SECURITY_POLICIES = _kind("SecurityPolicy")


@pytest.mark.parametrize(
    "sp", SECURITY_POLICIES, ids=[d["metadata"]["name"] for d in SECURITY_POLICIES]
)
def test_every_header_the_service_reads_reaches_the_check(sp: dict[str, Any]) -> None:
    ext = sp["spec"]["extAuth"]
    missing = [h for h in contract.REQUEST_HEADERS if not _sent_to_check(ext, h)]
    assert missing == []
    # Client-sent copies of our identity headers, so the service can remove them.
    assert _sent_to_check(ext, "x-stepup-user") and _sent_to_check(ext, "x-stepup-acr")


def test_the_header_check_can_fail() -> None:
    old = {"grpc": {}, "headersToExtAuth": ["authorization", "cookie", "accept", "x-request-id"]}
    assert not _sent_to_check(old, "x-forwarded-for")
    assert not _sent_to_check(old, "x-device-assertion")
    assert not _sent_to_check(old, "x-stepup-user")
    assert not _sent_to_check({"http": {}}, "cookie")


@pytest.mark.parametrize(
    "sp", SECURITY_POLICIES, ids=[d["metadata"]["name"] for d in SECURITY_POLICIES]
)
def test_fail_closed_with_a_timeout_above_the_service_budget(
    sp: dict[str, Any], chart: Any
) -> None:
    ext = sp["spec"]["extAuth"]
    assert ext["failOpen"] is False
    assert ext.get("statusOnError", 403) in (403, 503)
    budget = (RedisSettings().deadline_ms + AuditSettings().durable_deadline_ms) / 1000
    timeout = _seconds(ext["timeout"])  # absent: EG's 10 s
    assert budget + 0.05 < timeout <= 1.0
    # The chart's Service and its gRPC port.
    service = named(render(chart, values("minimal")), "Service", "stepup-authz")
    (ref,) = ext["grpc"]["backendRefs"]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert (ref["name"], ref["namespace"], ref["port"]) == (
        service["metadata"]["name"],
        "stepup-authz",
        ports["grpc"],
    )


def test_rule_level_policies_repeat_the_route_level_one() -> None:
    """A rule-level SecurityPolicy replaces the route-level one: its copy must not drift."""
    by_name = {d["metadata"]["name"]: d for d in SECURITY_POLICIES}
    base = by_name.pop("stepup-authz")["spec"]["extAuth"]
    for sp in by_name.values():
        ext = dict(sp["spec"]["extAuth"])
        ext.pop("contextExtensions")
        assert ext == base, sp["metadata"]["name"]


def _rules(route: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r.get("name", f"#{i}"): r for i, r in enumerate(route["spec"]["rules"])}


def _probes(
    match: dict[str, Any], claimed: set[tuple[str, str, str]]
) -> list[tuple[str, str, bool]]:
    """(method, path, bare) requests this match takes, to ask the policy for their level;
    ``bare`` marks a PathPrefix's own segment ("/wires" of /wires). A match without a
    method takes the methods no other rule claims on the same path (Gateway API prefers
    the match with a method)."""
    path = match["path"]
    key = (path["type"], path["value"])
    methods = (
        [match["method"]]
        if "method" in match
        else [m for m in ("GET", "HEAD", "POST", "DELETE") if (*key, m) not in claimed]
    )
    if path["type"] == "PathPrefix":
        base = path["value"].rstrip("/")
        paths = [(base + "/1", False), (base or "/", bool(base))]
    elif path["type"] == "Exact":
        paths = [(path["value"], False)]
    else:  # RegularExpression: the policy route with the same pattern says the level
        route = next(r for r in POLICY.routes if r.regex is not None)
        assert route.regex is not None and route.regex.pattern.strip("^$") == path["value"]
        paths = [("/clients/7/statements", False)]
    return [(m, p, bare) for m in methods for p, bare in paths]


def test_each_rule_carries_the_policys_level() -> None:
    """Rule-level contextExtensions give each sensitive rule exactly the level the policy
    gives its requests; the rules without one are covered by the route-level policy and
    are at the default level (or the service decides: public, exact paths)."""
    (app,) = [d for d in _kind("HTTPRoute") if d["metadata"]["name"] == "trading-web"]
    rules = _rules(app)
    levels: dict[str, str] = {}
    for sp in SECURITY_POLICIES:
        (level,) = [
            e["value"]
            for e in sp["spec"]["extAuth"].get("contextExtensions", [])
            if e["name"] == "stepup_level" and e["type"] == "Value"
        ] or [None]
        for ref in sp["spec"]["targetRefs"]:
            assert (ref["kind"], ref["name"]) == ("HTTPRoute", "trading-web")
            if "sectionName" in ref:
                assert ref["sectionName"] in rules, ref  # a rule that exists
                assert level is not None and level in POLICY.by_name
                levels[ref["sectionName"]] = level
            else:
                assert level is None  # the route-level policy: every rule is checked
    host = app["spec"]["hostnames"][0]
    claimed = {
        (m["path"]["type"], m["path"]["value"], m["method"])
        for r in rules.values()
        for m in r["matches"]
        if "method" in m
    }
    for name, rule in rules.items():
        for match in rule["matches"]:
            for method, path, bare in _probes(match, claimed):
                route = POLICY.route_for(host, method, path)
                wanted = (route.level if route is not None else POLICY.default_level).name
                if name in levels:
                    given = POLICY.by_name[levels[name]].rank
                    # Never below the policy; exactly it inside the prefix. The bare
                    # segment ("/wires" for /wires/) may be stricter: a level only raises.
                    assert given >= POLICY.by_name[wanted].rank, (name, method, path)
                    if not bare:
                        assert levels[name] == wanted, (name, method, path)
                else:  # no raise: it must not need one
                    assert POLICY.by_name[wanted].rank <= POLICY.default_level.rank, (
                        name,
                        method,
                        path,
                        wanted,
                    )


def test_only_the_apps_host_and_stepup_route_without_ext_auth() -> None:
    routes = {d["metadata"]["name"]: d for d in _kind("HTTPRoute")}
    app, stepup = routes["trading-web"], routes["stepup-endpoints"]
    assert app["spec"]["hostnames"] == stepup["spec"]["hostnames"] == ["trading.example.com"]
    targeted = {ref["name"] for sp in SECURITY_POLICIES for ref in sp["spec"]["targetRefs"]}
    assert "stepup-endpoints" not in targeted and "trading-web" in targeted
    ((rule,),) = [stepup["spec"]["rules"]]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/_stepup/"}}]
    (backend,) = rule["backendRefs"]
    assert backend == {"name": "stepup-authz", "port": 9192}


def test_client_traffic_policy_trusted_hops_and_paths() -> None:
    (ctp,) = _kind("ClientTrafficPolicy")
    gateways = {
        (p["namespace"], p["name"]) for d in _kind("HTTPRoute") for p in d["spec"]["parentRefs"]
    }
    (ref,) = ctp["spec"]["targetRefs"]
    assert gateways == {(ctp["metadata"]["namespace"], ref["name"])} and ref["kind"] == "Gateway"
    chart_hops = yaml.safe_load((ROOT / "k8s/stepup-authz/values.yaml").read_text())["proxy"][
        "xffNumTrustedHops"
    ]
    assert ctp["spec"]["clientIPDetection"]["xForwardedFor"]["numTrustedHops"] == chart_hops
    assert ctp["spec"]["path"]["escapedSlashesAction"] == "RejectRequest"
    assert ctp["spec"]["path"]["disableMergeSlashes"] is False
    assert ctp["spec"]["headers"]["withUnderscoresAction"] == "RejectRequest"


def test_manifests_are_plain_yaml() -> None:
    for path in EG.glob("*.yaml"):
        text = Path(path).read_text()
        assert "<<:" not in text and "&" not in re.sub(r"#.*", "", text), path


# The client address (docs/threat-model.md, "11. Client address"): EG's extAuth.grpc does
# not send x-stepup-peer-address; the EnvoyPatchPolicy inserts `render envoy`'s filter.


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json_patch_add(doc: Any, path: str, value: Any) -> None:
    """RFC 6902 ``add`` (the one operation the policy uses): into a list at an index."""
    *parents, last = _pointer(path)
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    assert isinstance(doc, list) and last.isdigit(), path
    doc.insert(int(last), value)


def _peer_patch() -> tuple[dict[str, Any], dict[str, Any]]:
    (epp,) = _kind("EnvoyPatchPolicy")
    (patch,) = epp["spec"]["jsonPatches"]
    return epp, patch


def test_the_patch_policy_inserts_render_envoys_peer_filter() -> None:
    epp, patch = _peer_patch()
    assert epp["apiVersion"] == "gateway.envoyproxy.io/v1alpha1" and epp["spec"]["type"] == (
        "JSONPatch"
    )
    # The Gateway the routes attach to, in its own namespace; its listener by EG's name.
    (ctp,) = _kind("ClientTrafficPolicy")
    assert epp["metadata"]["namespace"] == ctp["metadata"]["namespace"]
    assert epp["spec"]["targetRef"] == ctp["spec"]["targetRefs"][0]
    assert patch["type"] == "type.googleapis.com/envoy.config.listener.v3.Listener"
    assert patch["name"].startswith(f"{ctp['metadata']['namespace']}/eg/")
    op = patch["operation"]
    assert op["op"] == "add" and op["value"] == peer_address_filter()
    (mutation,) = op["value"]["typed_config"]["mutations"]["request_mutations"]
    assert mutation["append"]["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"


def test_real_envoy_accepts_the_patched_listener(tmp_path: Path) -> None:
    """The patch applied to a listener shaped as EG's (the connection manager in
    default_filter_chain), built from `render envoy` without its own peer filter: the
    filter lands before ext_authz and the real Envoy validates the result."""
    _, patch = _peer_patch()
    doc = render_envoy(POLICY, mode="grpc", hosts=["trading.example.com"])
    without_peer_filter(doc)
    listener = doc["static_resources"]["listeners"][0]
    (listener["default_filter_chain"],) = listener.pop("filter_chains")
    _json_patch_add(listener, patch["operation"]["path"], patch["operation"]["value"])
    names = [
        f["name"]
        for f in listener["default_filter_chain"]["filters"][0]["typed_config"]["http_filters"]
    ]
    assert names.index(peer_address_filter()["name"]) < names.index(EXT_AUTHZ)
    out = tmp_path / "eg.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert_valid(out)
