"""Package boundaries: shared imports nothing of ours; edge and ingestor never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"shared", "edge", "ingestor", "fxproxy"}
ALLOWED = {"shared": set(), "edge": {"shared", "edge"}, "ingestor": {"shared", "ingestor"}}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package: str) -> None:
    allowed = ALLOWED[package] | ({"shared"} if package == "shared" else set())
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_packages(path) - allowed
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
