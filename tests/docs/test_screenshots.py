"""The pictures in the docs are what the browser tests saw: every image under docs/img (and
every one the docs show) is written by a test that drives Chromium, by name.

Refresh them with the commands the docs give (e.g. ``STEPUP_SCREENSHOTS=docs/img`` for the
passkey pages, tests/integration/test_passkeys_browser.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from authz.demo.stack import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
IMG = REPO_ROOT / "docs" / "img"
PNG = b"\x89PNG\r\n\x1a\n"


def shown_in_docs() -> set[str]:
    names: set[str] = set()
    for doc in DOCS:
        names |= set(re.findall(r"\(img/([A-Za-z0-9_.-]+\.png)\)", doc.read_text()))
    return names


def taken_by_tests() -> dict[str, list[str]]:
    """Image file name -> the test files that take a screenshot under that name."""
    out: dict[str, list[str]] = {}
    for path in sorted((REPO_ROOT / "tests").rglob("test_*.py")):
        if path.resolve() == Path(__file__).resolve():
            continue  # this file names images only to test the check
        text = path.read_text()
        if ".screenshot(" not in text:
            continue
        for name in set(re.findall(r"[\"/]([A-Za-z0-9_.-]+\.png)\"", text)):
            out.setdefault(name, []).append(str(path.relative_to(REPO_ROOT)))
    return out


def not_from_tests(names: set[str]) -> list[str]:
    taken = taken_by_tests()
    return sorted(n for n in names if n not in taken)


def test_every_screenshot_in_the_docs_comes_from_a_browser_test() -> None:
    shown = shown_in_docs()
    assert {"passkey-stepup.png", "passkey-transaction.png", "evidence-report.png"} <= shown
    on_disk = {p.name for p in IMG.glob("*.png")}
    assert shown <= on_disk, f"shown but missing from docs/img: {sorted(shown - on_disk)}"
    assert not_from_tests(shown | on_disk) == [], "images no test takes"
    for name in shown | on_disk:
        assert (IMG / name).read_bytes()[:8] == PNG, name


def test_the_check_finds_an_image_no_test_takes() -> None:
    assert not_from_tests({"passkey-drawn-by-hand.png"}) == ["passkey-drawn-by-hand.png"]
