"""authz/render/contract.py against the service's own code: every request header the check
path reads (a ``headers.get("...")`` or ``headers["..."]`` in authz/check and authz/core)
is in the contract the proxy configs are checked against, so adding a header read without
passing it through every proxy fails here, not in production."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from authz.core.policy import load_policy
from authz.render import contract, ext_authz_filter, render_envoy

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
# Not the client's: the check request's own framing (HTTP mode) and what Envoy always sends.
NOT_CLIENT_HEADERS = {"host", "connection", "content-length"}


def _literal_header_reads(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        key: ast.expr | None = None
        target: ast.expr | None = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "get" and node.args:
                key, target = node.args[0], node.func.value
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            key, target = node.slice, node.value
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            continue
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "headers" and not key.value.startswith(":"):
            found.add(key.value.lower())
    return found


def service_header_reads() -> set[str]:
    files = sorted((ROOT / "authz" / "check").glob("*.py")) + sorted(
        (ROOT / "authz" / "core").glob("*.py")
    )
    return set().union(*(_literal_header_reads(f) for f in files)) - NOT_CLIENT_HEADERS


def test_every_header_the_check_path_reads_is_in_the_contract() -> None:
    reads = service_header_reads()
    assert {"authorization", "cookie", "accept", "x-forwarded-proto"} <= reads  # the scan works
    assert "x-forwarded-for" not in reads  # the client address is Envoy's, never derived
    assert reads - set(contract.REQUEST_HEADERS) == set()


def test_render_envoy_http_mode_passes_the_contract() -> None:
    """The HTTP mode sends the check only what allowed_headers names (the gRPC mode sends
    every header): all of the contract, the configured device assertion header, and the
    x-stepup- prefix."""
    policy = load_policy({"levels": {"standard": {}}, "default_level": "standard"})
    doc = render_envoy(policy, mode="http", hosts=["app.example"], device_assertion_header="X-MDM")
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    authz = hcm["typed_config"]["http_filters"][0]["typed_config"]
    patterns = authz["allowed_headers"]["patterns"]
    exact = {p["exact"] for p in patterns if "exact" in p}
    assert set(contract.REQUEST_HEADERS) | {"x-mdm"} <= exact
    assert {"prefix": "x-stepup-"} in patterns
    grpc = render_envoy(policy, hosts=["app.example"])
    grpc_hcm = grpc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert "allowed_headers" not in ext_authz_filter(grpc_hcm["typed_config"])["typed_config"]


def test_the_scan_finds_a_new_read(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f(attrs):\n"
        "    a = attrs.headers.get('X-Client-Hint')\n"
        "    b = headers['x-other']\n"
        "    headers['x-written'] = 1\n"
    )
    assert _literal_header_reads(probe) == {"x-client-hint", "x-other"}
