"""The package's dependency rules, checked on the source: only loop.py talks to Accelerate, and the
training path never imports the check-data report (it serves the CLI and API)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_only_the_loop_imports_accelerate():
    users = {p.name for p in PACKAGE.glob("*.py") if any(m.split(".")[0] == "accelerate" for m in imported_modules(p))}
    assert users == {"loop.py"}


def test_builders_do_not_import_the_entry_points():
    entry_points = {".api", ".cli", ".checkdata", ".bench", ".loop"}
    builders = ["typed.py", "images.py", "locate.py", "sources.py", "badimages.py", "balance.py", "data.py", "metrics.py",
                "review.py", "model.py", "groups.py", "optim.py"]
    for name in builders:
        assert not imported_modules(PACKAGE / name) & entry_points, name
