"""Package layering, read from the imports themselves (module level and inside functions)."""

from __future__ import annotations

import ast
import sys
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


# marble.errors holds only exception classes (it imports nothing of marble).
RL_ALLOWED = ("torch", "numpy", "osqp", "scipy", "marble.rl", "marble.errors")


def test_rl_is_pure_math_on_torch_numpy_osqp_scipy():
    # The balancing and loss math is tested against brute force: it must not reach into models,
    # rewards, configs or I/O, which would make those tests depend on them.
    offenders = {
        f"{p.relative_to(MARBLE.parent)}: {m}"
        for p in _files("rl")
        for m in imported_modules(p)
        if m.split(".")[0] not in sys.stdlib_module_names
        and not any(m == a or m.startswith(a + ".") for a in RL_ALLOWED)
    }
    assert not offenders, sorted(offenders)


MAX_FUNCTION_LINES = 60


def test_no_function_in_marble_is_longer_than_60_lines():
    long = []
    for path in sorted(MARBLE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(
                        f"{path.relative_to(MARBLE.parent)}:{node.lineno} {node.name} ({lines} lines)"
                    )
    assert not long, long
