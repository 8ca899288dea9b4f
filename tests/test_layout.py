"""The package's layout rules, checked on the source: sub-packages named after the stages of a run, with
dependencies pointing one way (recipe -> data -> reporting -> tasks -> model -> rundir -> training -> entry
points), only the
training loop importing Accelerate, every module under 300 lines, and a test module for every package
module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "finetune"
# What each layer may import from finetune, besides itself and the foundations (errors, atomic). The
# order: a recipe says what to do; data and model build from their own sections of it; reporting turns
# computed results into files; a task says what differs between kinds of targets, with reporting's help,
# and the model's prediction and export ask it; the run directory holds them all; training runs it all; the
# entry points expose it.
ALLOWED = {
    "recipe": set(),
    "data": {"recipe"},
    "reporting": {"recipe", "data"},
    "tasks": {"recipe", "data", "reporting"},
    "model": {"recipe", "data", "tasks"},
    "rundir": {"recipe", "data", "model", "reporting", "tasks"},
    "training": {"recipe", "data", "model", "reporting", "tasks", "rundir"},
}
FOUNDATIONS = {"errors", "atomic"}
ENTRY_POINTS = {"api", "cli", "__init__", "__main__"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def finetune_imports(path: Path) -> set[str]:
    """The finetune modules `path` imports, as dotted names below finetune (e.g. "model.plan")."""
    package = path.relative_to(PACKAGE).parent.parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - (node.level - 1)])
            names.add(".".join(base + ([node.module] if node.module else [])) or "__init__")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("finetune"):
            names.add(node.module.removeprefix("finetune").lstrip(".") or "__init__")
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("finetune.") for a in node.names if a.name.startswith("finetune.")}
    return names


def third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add((node.module or "").split(".")[0])
    return names


def test_the_top_level_is_sub_packages_and_entry_points():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == ENTRY_POINTS | FOUNDATIONS
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(ALLOWED)
    for name in packages:
        assert ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())), name


def test_no_sub_package_hides_a_name_of_the_api():
    """Importing finetune.X sets the attribute X of finetune, which would replace the API's X (finetune.runs,
    finetune.train) for everyone after the first import of the sub-package."""
    exported = ast.literal_eval(next(node.value for node in ast.parse((PACKAGE / "__init__.py").read_text()).body
                                     if isinstance(node, ast.Assign) and node.targets[0].id == "_EXPORTS"))
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages and not packages & set(exported)


@pytest.mark.parametrize("path", [p for p in modules() if p.parent != PACKAGE], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_dependencies_point_one_way(path):
    layer = path.relative_to(PACKAGE).parts[0]
    layers = {name.split(".")[0] for name in finetune_imports(path)} - FOUNDATIONS - {layer}
    assert layers <= ALLOWED[layer], f"{path.relative_to(PACKAGE)} imports {sorted(layers - ALLOWED[layer])}"


def test_foundations_import_nothing_of_finetune_but_each_other():
    for name in FOUNDATIONS:
        assert finetune_imports(PACKAGE / f"{name}.py") <= FOUNDATIONS, name


def test_only_training_imports_accelerate():
    users = {str(p.relative_to(PACKAGE)) for p in modules() if "accelerate" in third_party_imports(p)}
    assert users and all(user.startswith("training/") for user in users), users


def test_every_module_is_under_300_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in modules() if (n := len(p.read_text().splitlines())) > 300}
    assert not long


# The entry points are tested through what users run: the CLI and the API, end to end.
TESTED_BY = {"api": "end_to_end", "cli": "end_to_end", "errors": "faults"}


def test_every_module_has_a_docstring_and_a_test_module():
    """tests/ mirrors the package: test_<module>.py for each module, or test_<package>.py for a package
    whose modules are tested together."""
    tests = {p.stem.removeprefix("test_") for p in (ROOT / "tests").glob("test_*.py")}
    for path in modules():
        assert ast.get_docstring(ast.parse(path.read_text())), path
        if path.stem in ("__init__", "__main__"):
            continue
        mirror = {path.stem, path.parent.name, TESTED_BY.get(path.stem)}
        assert mirror & tests, f"no test module for {path.relative_to(PACKAGE)}"


def test_functions_stay_short_and_take_few_parameters():
    """A reader holds a function of finetune/training in one screen, and nothing but the public API (whose
    keywords are the recipe's) takes more than 8 parameters: more means a missing idea (a dataclass)."""
    import ast

    long, wide = [], []
    for path in modules():
        name = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args
            count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
            count -= bool(args.args) and args.args[0].arg in ("self", "cls")
            if name.startswith("training/") and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{name}:{node.name}")
            if count > 8 and not (name == "api.py" and not node.name.startswith("_")):
                wide.append(f"{name}:{node.name}")
    assert long == [] and wide == []


def test_nothing_is_unpickled_beyond_tensors():
    """docs/trust.md's promise, held by the code: every torch.load passes weights_only=True (PyTorch's
    restricted unpickler), and nothing calls pickle.load(s), numpy.load or Accelerate's load_state."""
    import ast

    unsafe = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name.endswith("torch.load") and not any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords):
                unsafe.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}")
            if name in ("pickle.load", "pickle.loads", "np.load", "numpy.load") or name.endswith(".load_state"):
                unsafe.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}")
    assert unsafe == []
