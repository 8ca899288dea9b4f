"""The `finetune` command's smaller subcommands, run in-process (training ones run as subprocesses in
test_end_to_end.py): `show` prints the fully resolved recipe."""

from __future__ import annotations

import pytest
import yaml

from finetune import cli
from finetune.recipe.load import load_recipe, recipe_to_dict


def write_recipe(path, recipe: dict):
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_show_prints_every_key_with_its_default_and_the_overrides(tmp_path, tiny_recipe, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    cli.main(["show", str(recipe), "optim.lr=0.001", "train.epochs=3"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == recipe_to_dict(load_recipe(recipe, ["optim.lr=0.001", "train.epochs=3"]))
    assert shown["optim"]["lr"] == 0.001 and shown["train"]["epochs"] == 3
    assert shown["optim"]["weight_decay"] == 0.05  # resolved from adamw's default, not null
    assert shown["freeze"]["bn"] != "auto" and "label_smoothing" in shown["train"]  # defaults written out
    assert load_recipe(shown) == load_recipe(recipe, ["optim.lr=0.001", "train.epochs=3"])  # and it loads back


def test_show_of_a_bad_recipe_is_one_error_and_exit_2(tmp_path, tiny_recipe, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    with pytest.raises(SystemExit) as exit_:
        cli.main(["show", str(recipe), "optim.lrr=1"])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert "optim.lrr: unknown key; did you mean optim.lr?" in captured.err and captured.out == ""


def test_a_graceful_stop_is_printed_as_a_stop_with_the_signals_exit_code(monkeypatch, capsys):
    """Issue 27.6: a stop that wrote what continues the run is no error; its exit code stays 128 + the signal."""
    import signal

    from finetune import api
    from finetune.training.interrupt import Interrupted

    def stopped(*args, **kwargs):
        raise Interrupted("stopped by SIGTERM after epoch 1; continue with `finetune train --resume out`.",
                          signal.SIGTERM)

    monkeypatch.setattr(api, "train", stopped)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "quickstart"])
    assert exit_.value.code == 143
    assert capsys.readouterr().err == ("finetune: stopped by SIGTERM after epoch 1; continue with "
                                       "`finetune train --resume out`.\n")  # a stop, not "finetune: error:"
