"""The plan of parameter groups: what `groups.build_plan` returns and what the rest of a run reads.

A `Plan` is data: its groups (each with an explicit peak `lr` and `weight_decay`, the epoch it trains
from and the factors of its LR), the unfreezing phases and the BatchNorm layers held in eval mode. It
prints as a table (`finetune plan`), saves as JSON (plan.json in every run), and turns into what the
loop needs: torch optimizer groups, `requires_grad` per phase and the norm layers to keep in eval mode.
`check_coverage` is its audit: every parameter of the model in exactly one group.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from torch import nn


@dataclass(frozen=True)
class ParamGroup:
    name: str  # "head", "backbone.no_decay", "stage2.frozen", "layer5.from2", ...; head groups contain "head"
    params: tuple[str, ...]  # parameter names, in model order
    numel: int  # number of scalar parameters
    lr: float  # peak learning rate (the schedule multiplies it); 0 when it never trains
    weight_decay: float
    trainable: bool  # in the optimizer: trains in at least one phase
    factors: dict[str, float] = field(default_factory=dict)  # lr = product of these
    # group_matcher(coarse=True) index among body stages, and coarse=False among body layers; None for the
    # head and for a group that spans several ("backbone").
    stage: int | None = None
    layer: int | None = None
    trains_from: int | None = 0  # first epoch (0-based) it trains; None: frozen for the whole run
    bn: str = "-"  # mode of the BatchNorm layers whose affine parameters are here ("-": none)

    @property
    def tensors(self) -> int:
        return len(self.params)

    def trains_at(self, epoch: int) -> bool:
        return self.trains_from is not None and epoch >= self.trains_from


@dataclass(frozen=True)
class Plan:
    groups: tuple[ParamGroup, ...]
    # (first epoch, stages frozen from then on): the unfreezing schedule; one entry when nothing thaws.
    phases: tuple[tuple[int, int], ...] = ((0, 0),)
    bn: str = "train"  # freeze.bn
    # BatchNorm layers inside frozen parts under bn eval/frozen, with or without affine parameters:
    # (module name, epoch it thaws or None).
    eval_norms: tuple[tuple[str, int | None], ...] = ()
    stage_examples: tuple[str, ...] = ()  # first parameter name of each body stage, for the table
    notes: tuple[str, ...] = ()  # what the table adds about this model (e.g. a body timm cannot split)

    def to_json(self) -> list[dict]:
        return [{**asdict(g), "params": list(g.params), "tensors": g.tensors} for g in self.groups]

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def phase_at(self, epoch: int) -> int:
        """1-based index of the phase that `epoch` (0-based) trains in."""
        return sum(1 for start, _ in self.phases if start <= epoch)

    def describe_phase(self, phase: int) -> str:
        n = self.phases[phase - 1][1]
        return "nothing frozen by stage" if n == 0 else "stage 0 frozen" if n == 1 else f"stages 0-{n - 1} frozen"

    @property
    def body_fixed(self) -> bool:
        """Nothing before the head changes in any phase: no body parameter ever trains and BatchNorm keeps
        its statistics (freeze.bn eval or frozen), so the body computes one fixed function of each image
        and its outputs can be computed once (data.feature_cache)."""
        return self.bn != "train" and all(not g.trainable for g in self.groups if "head" not in g.name)

    def table(self) -> str:
        rows = [("group", "stage", "layer", "tensors", "parameters", "peak lr", "wd", "trains", "bn", "lr factors",
                 "e.g.")]
        for g in self.groups:
            factors = " x ".join(f"{k}={v:.4g}" for k, v in g.factors.items()) or "-"
            trains = ("frozen" if g.trains_from is None else "yes" if g.trains_from == 0
                      else f"from epoch {g.trains_from} (phase {self.phase_at(g.trains_from)})")
            example = g.params[0] + (f" +{g.tensors - 1}" if g.tensors > 1 else "")
            rows.append((g.name, _dash(g.stage), _dash(g.layer), str(g.tensors), f"{g.numel:,}", f"{g.lr:.3g}",
                         f"{g.weight_decay:g}", trains, g.bn, factors, example))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        left = (0, 7, 8, 9, 10)
        lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                 for r in rows]
        lines.insert(1, "-" * max(len(line) for line in lines))
        trainable = sum(g.numel for g in self.groups if g.trains_from == 0)
        later = sum(g.numel for g in self.groups if g.trains_from not in (0, None))
        frozen = sum(g.numel for g in self.groups if g.trains_from is None)
        lines.append(f"trainable {trainable:,} parameters, frozen {frozen:,}"
                     + (f", thawing later {later:,}" if later else ""))
        if len(self.phases) > 1:
            lines.append("phases: " + "; ".join(f"{i + 1}) from epoch {e}: {self.describe_phase(i + 1)}"
                                                for i, (e, _) in enumerate(self.phases)))
        if self.body_fixed:
            lines.append("the body never changes: only the head trains, on features computed once per image "
                         "(data.feature_cache=none runs the whole model every step)")
        elif any(not g.trainable for g in self.groups) and all(
                not g.trainable or g.bn != "-" or "head" in g.name for g in self.groups):
            lines.append("the body is frozen but its BatchNorm affine trains (freeze.bn=eval), so the body still runs "
                         "forward and backward every step; freeze.bn=frozen makes a linear probe on cached features")
        lines += [f"note: {note}" for note in self.notes]
        something_frozen = self.eval_norms or any(g.trains_from != 0 for g in self.groups)
        lines.append((f"BatchNorm in frozen parts: {self.bn}; " if something_frozen else "") + "stages: "
                     + ", ".join(f"{i}={name}" for i, name in enumerate(self.stage_examples)))
        return "\n".join(lines)

    def optimizer_groups(self, model: nn.Module) -> list[dict]:
        """Torch optimizer param groups for every group that ever trains; `peak_lr` is what the schedule
        scales, `trains_from` the epoch before which the loop keeps the group still."""
        params = dict(model.named_parameters())
        return [{"params": [params[n] for n in g.params], "lr": g.lr, "peak_lr": g.lr, "trains_from": g.trains_from,
                 "weight_decay": g.weight_decay, "name": g.name} for g in self.groups if g.trainable]

    def apply_freezing(self, model: nn.Module, epoch: int | None = None) -> None:
        """Gradients on for what trains (at `epoch`; None: in any phase), off for the rest."""
        params = dict(model.named_parameters())
        for g in self.groups:
            for n in g.params:
                params[n].requires_grad_(g.trainable if epoch is None else g.trains_at(epoch))

    def frozen_norm_modules(self, model: nn.Module, epoch: int = 0) -> list[nn.Module]:
        """BatchNorm layers that run in eval mode at `epoch` (bn eval/frozen, inside a frozen part): they
        use and keep their loaded statistics. The loop re-applies this after every model.train()."""
        modules = dict(model.named_modules())
        return [modules[name] for name, thaw in self.eval_norms if thaw is None or epoch < thaw]


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


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

