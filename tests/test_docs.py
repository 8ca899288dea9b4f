"""README.md and docs/ held to the code, without training: every recipe key of the schema and every
subcommand and flag of the `finetune` parser is documented in docs/, every `finetune` command shown in a
code block parses with that parser, every relative link resolves, the README stays a front door (at most
320 lines), the module tour names every module, and a quoted error message is what the command prints."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import shlex
import typing
from pathlib import Path

import pytest

from finetune import cli
from finetune.recipe.schema import RecipeConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 320
# Pages written in another branch: a link to them may land before the page does.
PAGES_WRITTEN_ELSEWHERE = {DOCS / "trust.md"}
# Command lines in code blocks that argparse cannot judge (shell constructs such as pipes or $(...)).
# Keep this tiny: a command a reader copies should parse.
UNPARSABLE: set[str] = set()

CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [README] + sorted(DOCS.glob("*.md"))


def docs_text() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))


def prose(text: str) -> str:
    """The text outside fenced code blocks (where a `#` line is a comment, not a heading)."""
    return CODE_BLOCK.sub("", text)


def recipe_keys(cls: type = RecipeConfig, prefix: str = "") -> list[str]:
    """Every key a recipe may set, as `section.key` (nested sections as `train.early_stop.patience`)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        nested = [t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)]
        key = prefix + f.name
        if not (nested and not prefix):  # a top-level section (model, data, ...) is not a key itself
            keys.append(key)
        if nested:
            keys += recipe_keys(nested[0], key + ".")
    return keys


def subcommands() -> dict[str, list[str]]:
    """Each subcommand of the parser and the option strings it defines (-h/--help left out)."""
    parser = cli._parser()
    found = {"": [o for a in parser._actions if not isinstance(a, argparse._HelpAction) for o in a.option_strings
                  if not isinstance(a, argparse._SubParsersAction)]}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = [o for a in sub._actions if not isinstance(a, argparse._HelpAction)
                               for o in a.option_strings]
    return found


def shown_commands() -> list[tuple[str, str, list[str]]]:
    """(page, line, argv after `finetune`) of every command line in a code block of README.md or docs/:
    lines that start with `finetune ` (or `$ finetune `), and launcher lines that run `-m finetune`."""
    found = []
    for page in pages():
        for block in CODE_BLOCK.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                if line in UNPARSABLE:
                    continue
                if line.startswith("finetune "):
                    argv = shlex.split(line, comments=True)[1:]
                elif " -m finetune " in line:
                    argv = shlex.split(line.split(" -m finetune ", 1)[1], comments=True)
                else:
                    continue
                found.append((page.name, line, argv))
    return found


def parse_problem(argv: list[str], keys: bool = True) -> str | None:
    """What `finetune` would reject of argv before running anything (as cli.main parses), or None; with
    `keys`, also an override that names no recipe key."""
    parser = cli._parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args, extra = parser.parse_known_args(argv)
    except SystemExit as e:
        return None if e.code == 0 else err.getvalue().strip().splitlines()[-1]  # --help, --version: fine
    # cli.main's rule: what parse_known_args leaves over must be key=value overrides of a recipe command.
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        return f"unrecognized arguments: {' '.join(stray)}"
    if not keys:
        return None
    # An override must name a recipe key (the recipe check would refuse it later, once the recipe is read).
    overrides = [a for a in [getattr(args, "recipe", None) or "", *(getattr(args, "overrides", None) or []), *extra]
                 if "=" in a]
    unknown = [o for o in overrides if o.partition("=")[0] not in recipe_keys()]
    return f"unknown recipe keys: {unknown}" if unknown else None


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", prose(page.read_text()), re.MULTILINE)}


def test_every_recipe_key_of_the_schema_is_documented_in_docs():
    keys = recipe_keys()
    assert {"task", "train.micro_batch_size", "train.sync_bn", "train.threshold",
            "train.early_stop.patience"} <= set(keys)  # the walk reaches top-level and nested keys
    text = docs_text()
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"recipe keys without an entry in docs/ (add them to docs/recipes.md): {missing}"


def test_every_subcommand_and_flag_of_the_parser_is_documented_in_docs():
    commands = subcommands()
    assert {"train", "predict", "bench"} <= set(commands) and "--dynamic-batch" in commands["export"]
    sections = [s for page in sorted(DOCS.glob("*.md")) for s in re.split(r"^#+ ", page.read_text(), flags=re.M)]
    missing = []
    for name, flags in commands.items():
        # A flag counts where the same section of a page shows its command, so `--json` of `runs` is not
        # documented by `plan --json`.
        where = [s for s in sections if re.search(rf"finetune {re.escape(name)}(?![\w-])", s)] if name else sections
        if not where:
            missing.append(f"finetune {name}")
        missing += [f"finetune {name} {flag}".replace("  ", " ") for flag in flags
                    if not any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", s) for s in where)]
    assert not missing, f"not documented in docs/ (docs/cli.md lists every command and flag): {missing}"


def test_every_finetune_command_shown_in_readme_and_docs_parses():
    shown = shown_commands()
    assert len(shown) > 40  # the extraction finds the commands (a broken pattern would check nothing)
    deliberate = {command for _, command, _ in quoted_errors()}  # a quoted error's command shows a bad key
    wrong = [(page, line, problem) for page, line, argv in shown
             if (problem := parse_problem(argv, keys=line not in deliberate))]
    assert not wrong, f"commands that `finetune` would reject: {wrong}"


def test_the_parse_check_rejects_what_finetune_rejects():
    assert parse_problem(["train", "recipe.yaml", "--epochs", "3"]) is not None
    assert parse_problem(["predict", "RUN_DIR"]) is not None  # no image
    assert parse_problem(["runs", "runs", "old-runs"]) is not None  # one folder at most
    assert parse_problem(["train", "r.yaml", "--output", "o", "optim.lr=1e-3"]) is None
    assert parse_problem(["train", "r.yaml", "optim.lrr=1e-3"]) is not None
    assert parse_problem(["train", "--resume", "RUN_DIR", "train.epochs=20"]) is None


def test_the_readme_is_a_front_door_not_the_manual():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_the_readme_runs_the_whole_suite_between_the_test_command_markers():
    text = README.read_text()
    block = text.split("<!-- test-command -->", 1)[1].split("<!-- /test-command -->", 1)[0]
    command = [line for line in block.splitlines() if line and not line.startswith("```")]
    assert command == ['pip install -e ".[test]" && python -m pytest -q -m "" --hypothesis-profile=full '
                       '--durations=20']


def test_every_relative_link_points_to_an_existing_file_and_heading():
    broken = []
    for page in pages():
        for target in LINK.findall(prose(page.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if file in PAGES_WRITTEN_ELSEWHERE:
                continue
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, f"broken links: {broken}"


def test_the_module_tour_names_every_module():
    package = ROOT / "finetune"
    tour = (DOCS / "reading-the-code.md").read_text()
    modules = [p.relative_to(package).as_posix() for p in package.rglob("*.py")
               if "recipes" not in p.relative_to(package).parts]  # the recipe gallery, not code
    named = [m for m in modules if m.endswith("/__init__.py") or f"`{m}`" in tour]
    assert len(modules) > 60 and sorted(set(modules) - set(named)) == []


def quoted_errors() -> list[tuple[str, str, str]]:
    """(page, command, what it prints) of every code block that shows `$ finetune ...` and its error."""
    found = []
    for page in pages():
        for block in CODE_BLOCK.findall(page.read_text()):
            first, _, rest = block.partition("\n")
            if first.startswith("$ finetune ") and rest.startswith("finetune: error:"):
                found.append((page.name, first.removeprefix("$ "), rest))
    return found


@pytest.mark.parametrize(("page", "command", "printed"), quoted_errors(), ids=lambda v: str(v)[:40])
def test_a_quoted_error_is_what_the_command_prints(page, command, printed, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the quoted commands name recipes/... relative to the checkout
    with pytest.raises(SystemExit) as stopped:
        cli.main(shlex.split(command)[1:])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == printed, f"{page} quotes an error the code no longer prints"


def test_the_docs_quote_at_least_one_error():
    assert len(quoted_errors()) >= 2
