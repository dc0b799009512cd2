"""Policy validation: every refusal names the file, the place in the document and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.config.policy_file import PolicyHolder, parse_policy_text, read_policy
from authz.errors import PolicyError

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
levels:
  standard: {}
  elevated: {acr: [mfa], max_age: 900}
routes:
  - {path_prefix: /accounts/, level: elevated}
default_level: standard
"""


def test_shipped_policy_is_valid() -> None:
    loaded = read_policy(ROOT / "examples" / "policy.yaml")
    assert loaded.version == "demo-1"
    assert [lv.name for lv in loaded.policy.levels] == ["public", "standard", "elevated", "high"]
    assert loaded.policy.grant_levels == ("elevated", "high")


@pytest.mark.parametrize(
    ("text", "location", "reason"),
    [
        (
            GOOD.replace("level: elevated}", "level: elevatd}"),
            "line 5, column 38 (routes.0.level)",
            "unknown level 'elevatd'",
        ),
        (
            GOOD.replace("max_age: 900", "max_age: -1"),
            "line 3, column 35 (levels.elevated.max_age)",
            "must be an integer",
        ),
        (
            GOOD.replace("path_prefix: /accounts/", "path_prefix: accounts/"),
            "line 5, column 19 (routes.0.path_prefix)",
            "must be a string starting with '/'",
        ),
        (
            GOOD.replace("{path_prefix: /accounts/,", "{path_regex: '(', "),
            "line 5, column 18 (routes.0.path_regex)",
            "not an RE2 regular expression (missing ): ()",
        ),
        (
            GOOD.replace("default_level: standard", "default_level: nope"),
            "line 6, column 16 (default_level)",
            "unknown level 'nope'",
        ),
        (
            GOOD + "rules:\n  - {when: {ip_in: [10.0.0.1/8]}, deny: x}\n",
            "line 8, column 21 (rules.0.when.ip_in.0)",
            "invalid CIDR block",
        ),
        (
            GOOD + "rules:\n  - {when: {ip_in: [10.0.0.0/8]}, deny: x, raise_to: elevated}\n",
            "line 8, column 5 (rules.0)",
            "exactly one of raise_to or deny",
        ),
        (
            GOOD.replace("routes:", "routes:\n  - {path: /a, methods: [FETCH], level: standard}"),
            "line 5, column 26 (routes.0.methods.0)",
            "unknown method 'FETCH'",
        ),
        ("levels: [\n", "line 2, column 1", "invalid YAML"),
    ],
)
def test_refusals_point_at_the_line(text: str, location: str, reason: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy_text(text, "p.yaml")
    message = str(info.value)
    assert message.startswith("p.yaml:"), message
    assert location.split(" (")[0] in message, message
    assert reason in message, message


def test_unknown_top_level_field_is_named() -> None:
    with pytest.raises(PolicyError, match=r"line 7, column 9 \(colour\): unknown field"):
        parse_policy_text(GOOD + "colour: blue\n", "p.yaml")


def test_hot_reload_keeps_last_good(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text(GOOD)
    events: list[str] = []
    holder = PolicyHolder(f, on_reload=lambda result, old, new, err: events.append(result))
    first = holder.current
    f.write_text(GOOD.replace("max_age: 900", "max_age: oops"))
    assert holder.changed()
    assert holder.reload() is False
    assert holder.current is first  # the last good policy stays in force
    f.write_text(GOOD.replace("max_age: 900", "max_age: 600"))
    assert holder.reload() is True
    assert holder.current.policy.by_name["elevated"].max_age == 600
    assert events == ["error", "success"]


def test_reload_of_an_unchanged_file_is_not_a_swap(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text(GOOD)
    holder = PolicyHolder(f)
    first = holder.current
    assert holder.reload() is False and holder.current is first
