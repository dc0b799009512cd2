"""The one YAML loader: syntax errors and repeated keys refused with file, line and column;
validation errors placed on the line they come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.config.policy_file import parse_policy_text
from authz.config.settings import load_settings
from authz.config.yamlfile import load_yaml
from authz.errors import ConfigError, PolicyError

POLICY = """\
levels:
  standard: {}
  high: {acr: [phr], max_age: 300}
default_level: standard
routes:
  - {path_prefix: /wires/, level: high}
"""


def test_a_repeated_top_level_key_is_refused_with_its_line() -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy_text(POLICY + "default_level: high\n", "policy.yaml")
    assert str(err.value) == (
        "policy.yaml:line 7, column 1: duplicate key 'default_level' (first given at line 4)"
    )


def test_a_repeated_level_is_refused() -> None:
    text = POLICY.replace(
        "  high: {acr: [phr], max_age: 300}\n", "  high: {acr: [phr]}\n  high: {}\n"
    )
    with pytest.raises(PolicyError, match="duplicate key 'high'"):
        parse_policy_text(text, "policy.yaml")


def test_a_repeated_key_inside_a_flow_mapping_is_refused() -> None:
    with pytest.raises(ConfigError, match="duplicate key 'level'"):
        load_yaml("routes: [{path: /a, level: x, level: y}]\n", "f.yaml")


def test_merge_keys_may_override() -> None:
    doc = load_yaml("base: &b {a: 1, b: 2}\nderived:\n  <<: *b\n  b: 3\n", "f.yaml").doc
    assert doc["derived"] == {"a": 1, "b": 3}


def test_a_syntax_error_names_the_line() -> None:
    with pytest.raises(ConfigError) as err:
        load_yaml("a: [1, 2\nb: 3\n", "f.yaml")
    assert err.value.source == "f.yaml"
    assert err.value.location.startswith("line ")


def test_locate_follows_mappings_and_sequences() -> None:
    parsed = load_yaml(POLICY, "policy.yaml")
    assert parsed.locate("routes.0.level") == "line 6, column 35 (routes.0.level)"
    assert parsed.locate("nowhere.deep") == "line 1, column 1 (nowhere.deep)"


def test_a_settings_error_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    cfg = tmp_path / "settings.yaml"
    cfg.write_text(
        "policy_file: policy.yaml\n"
        "oidc:\n  issuer: https://idp\n  client_id: c\n  audience: a\n"
        "redis:\n  deadline_ms: 0\n"
    )
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert err.value.source == str(cfg)
    assert err.value.location == "line 7, column 16 (redis.deadline_ms)"


def test_a_repeated_settings_key_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "settings.yaml"
    cfg.write_text("policy_file: a.yaml\npolicy_file: b.yaml\n")
    with pytest.raises(ConfigError, match="duplicate key 'policy_file'"):
        load_settings(cfg, env={})
