"""The parameter-group builder: model + optim/freeze config -> an audited plan of optimizer groups.

Every parameter is first described on its own (head or backbone, decay or not, frozen or not, and the
factors that make its learning rate); parameters with identical settings then share a group. Every
group carries an explicit `lr` and `weight_decay`, so the schedule can be a plain multiplier and the
head's 10x ratio survives any schedule. Frozen parameters are listed too (trainable false, lr 0) so the
plan accounts for every parameter exactly once; they are kept out of the optimizer.

No-decay is decided by module type and tensor shape (norm layers, biases, any tensor of rank <= 1) plus
the names the model itself declares in `no_weight_decay()` (ViT position embeddings and class tokens).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from torch import nn

from .config import FreezeConfig, OptimConfig

NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES += (nn.RMSNorm,)


@dataclass(frozen=True)
class ParamGroup:
    name: str  # "head", "backbone.no_decay", ...; the head's group names contain "head"
    params: tuple[str, ...]  # parameter names, in model order
    numel: int  # number of scalar parameters
    lr: float  # peak learning rate (the schedule multiplies it); 0 when frozen
    weight_decay: float
    trainable: bool
    factors: dict[str, float] = field(default_factory=dict)  # lr = product of these

    @property
    def tensors(self) -> int:
        return len(self.params)


@dataclass(frozen=True)
class Plan:
    groups: tuple[ParamGroup, ...]

    def to_json(self) -> list[dict]:
        return [{**asdict(g), "params": list(g.params), "tensors": g.tensors} for g in self.groups]

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def table(self) -> str:
        rows = [("group", "tensors", "parameters", "lr", "weight decay", "trainable", "lr factors")]
        for g in self.groups:
            factors = " x ".join(f"{k}={v:g}" for k, v in g.factors.items()) or "-"
            rows.append((g.name, str(g.tensors), f"{g.numel:,}", f"{g.lr:.3g}", f"{g.weight_decay:g}",
                         "yes" if g.trainable else "frozen", factors))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        trainable = sum(g.numel for g in self.groups if g.trainable)
        frozen = sum(g.numel for g in self.groups if not g.trainable)
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"trainable {trainable:,} parameters, frozen {frozen:,}")
        return "\n".join(lines)

    def optimizer_groups(self, model: nn.Module) -> list[dict]:
        """Torch optimizer param groups for the trainable groups; `peak_lr` is what the schedule scales."""
        params = dict(model.named_parameters())
        return [{"params": [params[n] for n in g.params], "lr": g.lr, "peak_lr": g.lr,
                 "weight_decay": g.weight_decay, "name": g.name} for g in self.groups if g.trainable]

    def apply_freezing(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for g in self.groups:
            for n in g.params:
                params[n].requires_grad_(g.trainable)

    def frozen_norm_modules(self, model: nn.Module) -> list[nn.Module]:
        """Norm layers with running statistics whose parameters are all frozen: they run in eval mode,
        so their loaded statistics are used and kept (a frozen backbone stays bit-for-bit as loaded)."""
        frozen = {n for g in self.groups if not g.trainable for n in g.params}
        modules = []
        for name, module in model.named_modules():
            own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
            if getattr(module, "track_running_stats", False) and own and all(n in frozen for n in own):
                modules.append(module)
        return modules


def build_plan(model: nn.Module, optim: OptimConfig, freeze: FreezeConfig) -> Plan:
    """Describe every parameter, then gather identical settings into named groups, in model order."""
    head = _head_param_names(model)
    no_decay = _no_decay_names(model)
    buckets: dict[str, dict] = {}
    for name, param in model.named_parameters():
        part = "head" if name in head else "backbone"
        frozen = part == "backbone" and freeze.backbone
        factors = {"optim.lr": optim.lr}
        if part == "head":
            factors["head_lr_mult"] = optim.head_lr_mult
        decay = name not in no_decay
        if frozen:
            group_name, lr, wd = f"{part}.frozen", 0.0, 0.0
        else:
            group_name = part if decay else f"{part}.no_decay"
            lr = math.prod(factors.values())
            wd = optim.weight_decay if decay else 0.0
        bucket = buckets.setdefault(group_name, {"params": [], "numel": 0, "lr": lr, "weight_decay": wd,
                                                 "trainable": not frozen, "factors": {} if frozen else factors})
        bucket["params"].append(name)
        bucket["numel"] += param.numel()
    plan = Plan(tuple(ParamGroup(name=k, params=tuple(v.pop("params")), **v) for k, v in buckets.items()))
    check_coverage(plan, model)
    return plan


def check_coverage(plan: Plan, model: nn.Module) -> None:
    """Every parameter of the model in exactly one group; raise (a bug in the builder) otherwise."""
    seen: dict[str, str] = {}
    for g in plan.groups:
        for n in g.params:
            if n in seen:
                raise RuntimeError(f"parameter {n} is in two groups: {seen[n]} and {g.name}")
            seen[n] = g.name
    missing = [n for n, _ in model.named_parameters() if n not in seen]
    if missing:
        raise RuntimeError(f"{len(missing)} parameters are in no group, e.g. {missing[:3]}")
    unknown = set(seen) - {n for n, _ in model.named_parameters()}
    if unknown:
        raise RuntimeError(f"the plan names parameters the model does not have: {sorted(unknown)[:3]}")


def _head_param_names(model: nn.Module) -> set[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _no_decay_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if isinstance(module, NORM_TYPES) or p.ndim <= 1:
                names.add(f"{module_name}.{p_name}" if module_name else p_name)
    declared = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    for name, _ in model.named_parameters():
        if name in declared or name.split(".")[0] in declared:
            names.add(name)
    return names
