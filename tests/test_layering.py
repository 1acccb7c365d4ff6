"""The dependency rule: imports flow bundles ← agent ← hub; sim imports none of them; production
code never imports sim (the demo, hub/demo.py, may use everything)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "bundles": {"agent", "hub", "sim"},
    "agent": {"hub", "sim"},
    "hub": {"sim"},
    "sim": {"bundles", "agent", "hub"},
}
ALLOWED_FILES = {ROOT / "hub" / "demo.py"}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path in ALLOWED_FILES:
            continue
        bad = _imported_packages(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, offenders


@pytest.mark.parametrize("package", ["bundles", "agent"])
def test_agent_side_imports_only_its_declared_dependencies(package: str) -> None:
    """The agent is installed on nodes without the hub's extras: a module of a hub-only (or
    undeclared) distribution, e.g. pydantic-settings, fails there at import time."""
    import importlib.metadata
    import re
    import sys
    import tomllib

    declared = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower().replace("_", "-")
                for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    dists = importlib.metadata.packages_distributions()
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in _imported_packages(path) - set(sys.stdlib_module_names) - set(FORBIDDEN) - {"__future__"}:
            owners = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
            if not owners & declared:
                offenders.append(f"{path.relative_to(ROOT)} imports {module} ({', '.join(sorted(owners))})")
    assert not offenders, offenders
