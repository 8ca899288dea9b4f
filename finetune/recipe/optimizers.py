"""Which optimizer a recipe may name in `optim.name`, and the LR and weight decay it gets when the recipe
leaves them out.

Our own names are adamw and sgd (torch's fused kernels, which skip a bad update on the device) and lbfgs
(a linear probe's full-batch head fit). Every other name is one of timm's (`timm.optim.list_optimizers()`:
lamb, lion, adafactor, ...), built by `timm.optim.create_optimizer_v2` over the plan's groups (model/optim.py).
A misspelt name gets a "did you mean" listing close ones. Defaults live in schema.OPTIMIZER_DEFAULTS; a timm
optimizer without an entry there has no fine-tuning scale we could vouch for, so its recipe must give
optim.lr and optim.weight_decay.
"""

from __future__ import annotations

import dataclasses
import difflib

from .schema import OPTIMIZER_DEFAULTS, OptimConfig
from .typed import shown

OWN_OPTIMIZERS = ("adamw", "sgd", "lbfgs")
# timm names the loop cannot drive: adahessian needs the backward pass to build a graph of the gradients
# (backward(create_graph=True)), which the training step never does.
UNSUPPORTED = {"adahessian": "it needs second-order gradients (backward with create_graph=True), which finetune's "
                             "training step does not compute"}


def optimizer_names() -> list[str]:
    """Every name optim.name accepts: ours first, then timm's (timm's adamw and sgd are ours)."""
    import timm.optim  # imported here: loading a recipe for --help or an error message should not wait for torch

    return list(OWN_OPTIMIZERS) + [n for n in timm.optim.list_optimizers()
                                   if n not in OWN_OPTIMIZERS and n not in UNSUPPORTED]


def resolve_optimizer(optim: OptimConfig, bad: set[str]) -> tuple[OptimConfig, list[str]]:
    """optim with its name checked and lr / weight_decay filled from OPTIMIZER_DEFAULTS; the problems found.
    A bad name or a missing value falls back to adamw's, so the other checks of the recipe still run."""
    errors: list[str] = []
    name = optim.name
    if "optim.name" not in bad:
        problem = check_optimizer_name(name)
        if problem:
            errors.append(problem)
            bad.add("optim.name")
    if "optim.name" in bad:
        name = "adamw"
    defaults = OPTIMIZER_DEFAULTS.get(name)
    values = {"lr": optim.lr, "weight_decay": optim.weight_decay}
    for key, value in values.items():
        if value is not None:
            continue
        if defaults is None:
            errors.append(f"optim.{key}: optim.name={name} is timm's, and finetune has no measured fine-tuning "
                          f"default for its {key.replace('_', ' ')}; give optim.lr and optim.weight_decay (peak "
                          "values for the backbone; the head gets lr x head_lr_mult), or use one of "
                          f"{', '.join(sorted(OPTIMIZER_DEFAULTS))}, which have defaults.")
            bad.add(f"optim.{key}")
        values[key] = (defaults or OPTIMIZER_DEFAULTS["adamw"])[key]
    return dataclasses.replace(optim, name=name, **values), errors


def check_optimizer_name(name: str) -> str | None:
    """None when optim.name is one finetune can train with, else the error, with close names."""
    if name in UNSUPPORTED:
        return f"optim.name: {name} is timm's, but {UNSUPPORTED[name]}; choose another optimizer."
    names = optimizer_names()
    if name in names:
        return None
    close = difflib.get_close_matches(name.lower(), names, n=5, cutoff=0.6)
    hint = (f"did you mean {', '.join(close)}?" if close
            else "python -c \"import timm.optim; print(timm.optim.list_optimizers())\" lists timm's names.")
    return (f"optim.name: {shown(name)} is neither finetune's own optimizer ({', '.join(OWN_OPTIMIZERS)}) nor one "
            f"of timm's; {hint}")
