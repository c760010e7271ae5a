"""Package layering, read from the imports themselves (module level and inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MARBLE = Path(__file__).resolve().parents[1] / "marble"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (absolute names)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _files(package: str) -> list[Path]:
    return sorted((MARBLE / package).rglob("*.py"))


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("models", "marble.rewards"),
        ("rewards", "marble.eval"),
        ("hub", "marble.models"),
        ("hub", "marble.rewards"),
        ("hub", "marble.eval"),
        ("hub", "marble.train"),
    ],
)
def test_package_does_not_import(package, forbidden):
    offenders = {
        f"{p.relative_to(MARBLE.parent)}: {m}"
        for p in _files(package)
        for m in imported_modules(p)
        if m == forbidden or m.startswith(forbidden + ".")
    }
    assert not offenders, sorted(offenders)


def test_real_rewards_do_not_import_the_tiny_worlds_rule_rewards():
    offenders = {
        p.name
        for p in _files("rewards")
        if p.name not in ("offline.py", "registry.py")
        for m in imported_modules(p)
        if m.startswith("marble.rewards.offline")
    }
    assert not offenders, sorted(offenders)
