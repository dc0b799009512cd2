"""Reason slugs are written in one place: authz/core/reasons.py.

A slug written as a string literal elsewhere is a second definition that can drift (a
header saying one thing, the metric label another). Refused here, by reading the tree:

- any string literal equal to a multi-word reason slug (``bad-path``, ``token-invalid``...)
  anywhere in ``authz/`` outside ``core/reasons.py`` and generated code;
- any string literal equal to any reason slug where it is used as a reason: a ``reason=``
  keyword argument, or compared with something named ``reason``.

One-word slugs (``allowed``, ``public``, ``success``) are ordinary words elsewhere (a
policy key, a reload result), so only their use as a reason is refused.
"""

from __future__ import annotations

import ast
from pathlib import Path

from authz.core.reasons import Reason

ROOT = Path(__file__).resolve().parents[2] / "authz"
SLUGS = {r.value for r in Reason}
MULTI_WORD = {s for s in SLUGS if "-" in s}
SKIP = {ROOT / "core" / "reasons.py"}


def _sources() -> list[Path]:
    return [
        p
        for p in sorted(ROOT.rglob("*.py"))
        if p not in SKIP and "proto" not in p.relative_to(ROOT).parts
    ]


def _is_reason_name(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return "reason" in node.id
    if isinstance(node, ast.Attribute):
        return "reason" in node.attr
    return False


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[str] = []

    def flag(node: ast.AST, why: str) -> None:
        found.append(f"{path}:{getattr(node, 'lineno', '?')}: {why}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in MULTI_WORD:
                flag(node, f"reason slug {node.value!r} written out")
        elif isinstance(node, ast.keyword) and node.arg == "reason":
            v = node.value
            if isinstance(v, ast.Constant) and isinstance(v.value, str) and v.value in SLUGS:
                flag(v, f"reason={v.value!r}")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_reason_name(s) for s in sides):
                for s in sides:
                    if (
                        isinstance(s, ast.Constant)
                        and isinstance(s.value, str)
                        and s.value in SLUGS
                    ):
                        flag(s, f"compared with reason slug {s.value!r}")
    return found


def test_no_reason_slug_is_written_outside_core_reasons() -> None:
    offences = [o for p in _sources() for o in _offences(p)]
    assert offences == []


def test_the_check_finds_planted_offences(tmp_path: Path) -> None:
    # A vacuous pass (no files found, or a walker that sees nothing) would hide every
    # offence: the same walker must find each kind in a planted file.
    assert len(_sources()) > 50
    planted = tmp_path / "authz" / "planted.py"
    planted.parent.mkdir()
    planted.write_text(
        'a = "bad-path"\n'
        'f(reason="allowed")\n'
        'if decision.reason == "public":\n    pass\n'
        'ok = {"public": True, "result": "success"}\n'
    )
    got = _offences(planted)
    assert sorted(o.split(": ", 1)[1] for o in got) == [
        "compared with reason slug 'public'",
        "reason slug 'bad-path' written out",
        "reason='allowed'",
    ]
