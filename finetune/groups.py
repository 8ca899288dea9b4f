"""The parameter-group builder: model + optim/freeze config -> an audited plan of optimizer groups.

Every parameter is first described on its own: head or body, its stage (timm's `group_matcher(coarse=True)`:
the stem, then stages or blocks) and layer (`coarse=False`, for layer-wise LR decay), decay or not, the
epoch from which it trains (0: always; None: never; later: gradual unfreezing) and the factors whose
product is its peak LR. Parameters with identical settings then share a group. Every group carries an
explicit `lr` and `weight_decay`, so the schedule is a plain multiplier and every ratio (head 10x, layer
decay, lr_mult) survives any schedule: timm's own layer decay stores an `lr_scale` that only timm's
schedulers read. Groups that never train are listed too (lr 0) so the plan accounts for every parameter
exactly once; they are kept out of the optimizer. Groups that thaw later are in the optimizer from step 0;
the loop keeps them still until their epoch.

No-decay is decided by module type and tensor shape (norm layers, biases, any tensor of rank <= 1) plus
the names the model itself declares in `no_weight_decay()` (ViT position embeddings and class tokens).
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass, field

from timm.models import group_parameters
from torch import nn

from .config import FreezeConfig, OptimConfig
from .errors import FinetuneError

NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES += (nn.RMSNorm,)
BATCH_NORM = nn.modules.batchnorm._BatchNorm  # SyncBatchNorm and timm's BatchNormAct2d included


@dataclass(frozen=True)
class ParamGroup:
    name: str  # "head", "backbone.no_decay", "stage2.frozen", "layer5.from2", ...; head groups contain "head"
    params: tuple[str, ...]  # parameter names, in model order
    numel: int  # number of scalar parameters
    lr: float  # peak learning rate (the schedule multiplies it); 0 when it never trains
    weight_decay: float
    trainable: bool  # in the optimizer: trains in at least one phase
    factors: dict[str, float] = field(default_factory=dict)  # lr = product of these
    stage: int | None = None  # group_matcher(coarse=True) index among body stages; None for the head
    layer: int | None = None  # group_matcher(coarse=False) index among body layers; None for the head
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
    # BatchNorm layers inside frozen parts under bn eval/frozen: (module name, epoch it thaws or None).
    eval_norms: tuple[tuple[str, int | None], ...] = ()
    stage_examples: tuple[str, ...] = ()  # first parameter name of each body stage, for the table

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
        lines.append(f"BatchNorm in frozen parts: {self.bn}; stages: "
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


def build_plan(model: nn.Module, optim: OptimConfig, freeze: FreezeConfig) -> Plan:
    """Describe every parameter, then gather identical settings into named groups, in model order."""
    head = _head_param_names(model)
    no_decay = _no_decay_names(model)
    named = list(model.named_parameters())
    body = [n for n, _ in named if n not in head]
    stage_of = _dense_ids(model, body, coarse=True)
    layer_of = _dense_ids(model, body, coarse=False)
    num_stages = max(stage_of.values(), default=-1) + 1
    top_layer = max(layer_of.values(), default=0)
    phases = _phases(freeze, num_stages)
    pattern_frozen = set().union(*_match(freeze.patterns, [n for n, _ in named], "freeze.patterns").values())
    mult_matches = _match(list(optim.lr_mult), [n for n, _ in named], "optim.lr_mult")
    bn_params = {f"{m_name}.{p}" if m_name else p: m_name for m_name, m in model.named_modules()
                 if isinstance(m, BATCH_NORM) for p, _ in m.named_parameters(recurse=False)}
    part_from: dict[str, int | None] = {}  # when the part a parameter belongs to trains, before any BN rule
    for name in (n for n, _ in named):
        if name in pattern_frozen:
            part_from[name] = None
        elif name in head:
            part_from[name] = 0
        else:  # the first phase that leaves this stage unfrozen
            part_from[name] = next((e for e, n in phases if stage_of[name] >= n), None)
    # Groups follow stages only where stages differ in when they train; otherwise one "backbone".
    split_stages = len({part_from[n] for n in body if n not in pattern_frozen}) > 1

    bn_mode: dict[str, int | None] = {}  # BatchNorm module -> epoch its part (all its parameters) thaws, or None
    for name, module_name in bn_params.items():
        before = bn_mode.get(module_name, 0)
        bn_mode[module_name] = None if before is None or part_from[name] is None else max(before, part_from[name])
    eval_norms = tuple((m, thaw) for m, thaw in bn_mode.items() if freeze.bn != "train" and thaw != 0)

    buckets: dict[str, dict] = {}
    for name, param in named:
        trains_from = part_from[name]
        # train/eval keep BatchNorm's affine learning inside frozen stages; only a pattern freezes it.
        if name in bn_params and freeze.bn != "frozen" and name not in pattern_frozen:
            trains_from = 0
        factors = {"optim.lr": optim.lr}
        if name in head:
            label, stage, layer = "head", None, None
        else:
            stage, layer = stage_of[name], layer_of[name]
            label = f"layer{layer}" if optim.layer_decay else f"stage{stage}" if split_stages else "backbone"
            if optim.layer_decay:
                factors["layer_decay"] = optim.layer_decay ** (top_layer - layer)
        if name in head:
            factors["head_lr_mult"] = optim.head_lr_mult
        globs = [g for g in optim.lr_mult if name in mult_matches[g]]
        for glob in globs:
            factors[f"lr_mult[{glob}]"] = optim.lr_mult[glob]
        decay = name not in no_decay
        group_name = (label + ("" if decay else ".no_decay") + "".join(f"[{g}]" for g in globs)
                      + (".frozen" if trains_from is None else f".from{trains_from}" if trains_from else ""))
        bn = "-"
        if name in bn_params:
            thaw = bn_mode[bn_params[name]]
            bn = ("train" if freeze.bn == "train" or thaw == 0 else
                  "eval" if thaw is None else f"eval until epoch {thaw}")
        settings = {"lr": 0.0 if trains_from is None else math.prod(factors.values()),
                    "weight_decay": optim.weight_decay if decay and trains_from is not None else 0.0,
                    "trainable": trains_from is not None, "factors": {} if trains_from is None else factors,
                    "trains_from": trains_from}
        bucket = buckets.setdefault(group_name, {"params": [], "numel": 0, **settings, "stage": stage, "layer": layer,
                                                 "bn": set()})
        if any(bucket[k] != v for k, v in settings.items()):
            raise RuntimeError(f"group {group_name}: parameters with different settings ({name})")
        bucket["stage"] = bucket["stage"] if bucket["stage"] == stage else None
        bucket["layer"] = bucket["layer"] if bucket["layer"] == layer else None
        bucket["bn"].add(bn)
        bucket["params"].append(name)
        bucket["numel"] += param.numel()
    groups = []
    for key, v in buckets.items():
        modes = v.pop("bn")
        modes = sorted(modes - {"-"}) if modes != {"-"} else ["-"]
        groups.append(ParamGroup(name=key, params=tuple(v.pop("params")), bn="/".join(modes), **v))
    examples = [""] * num_stages
    for name in reversed(body):
        examples[stage_of[name]] = name
    if not any(g.trainable for g in groups):
        raise FinetuneError("the freeze settings leave no parameter to train (freeze.patterns froze the head too?); "
                            "`finetune plan RECIPE` shows what is frozen.")
    plan = Plan(tuple(groups), tuple(phases), freeze.bn, eval_norms, tuple(examples))
    check_coverage(plan, model)
    return plan


def _dense_ids(model: nn.Module, body: list[str], coarse: bool) -> dict[str, int]:
    """Body parameter -> 0-based stage (coarse) or layer index from the model's own group_matcher, in
    depth order. Without a matcher the whole body is one stage."""
    if not hasattr(model, "group_matcher"):
        return {n: 0 for n in body}
    ids = group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
    dense = {old: new for new, old in enumerate(sorted({ids[n] for n in body}))}
    return {n: dense[ids[n]] for n in body}


def _phases(freeze: FreezeConfig, num_stages: int) -> list[tuple[int, int]]:
    """[(first epoch, stages frozen)], starting at epoch 0, stages only ever thawing."""
    initial = num_stages if freeze.backbone else freeze.stages
    thaw = {freeze.unfreeze_at: 0} if freeze.unfreeze_at else dict(freeze.phases)
    phases = dict([(0, initial)] + sorted(thaw.items()))
    for epoch, stages in phases.items():
        if stages > num_stages:
            key = "freeze.stages" if epoch not in thaw else f"freeze.phases.{epoch}"
            raise FinetuneError(f"{key}={stages}, but this backbone has {num_stages} stages (timm's "
                                f"group_matcher: the stem, then stages or blocks); `finetune plan` lists them. "
                                f"Give at most {num_stages}, or freeze.backbone=true for all of them.")
    counts = list(phases.values())
    if any(b > a for a, b in zip(counts, counts[1:])):
        raise FinetuneError(f"freeze: the phases {dict(phases)} (epoch: frozen stages, starting from "
                            f"freeze.stages or freeze.backbone) would freeze a stage again; phases may only thaw, "
                            "so give each later epoch the same or fewer stages.")
    return [(e, n) for i, (e, n) in enumerate(phases.items()) if i == 0 or n != counts[i - 1]]


def _match(globs: list[str], names: list[str], key: str) -> dict[str, set[str]]:
    """glob -> parameter names it matches (fnmatch); a glob that matches nothing is a user error."""
    matches = {g: {n for n in names if fnmatch.fnmatchcase(n, g)} for g in globs}
    empty = [g for g, hit in matches.items() if not hit]
    if empty:
        raise FinetuneError(f"{key}: {', '.join(repr(g) for g in empty)} match{'es' if len(empty) == 1 else ''} no "
                            f"parameter of this model (names look like {names[0]!r}, {names[len(names) // 2]!r}); "
                            "`finetune plan RECIPE --json` lists every name.")
    return {g: hit for g, hit in matches.items()}


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
