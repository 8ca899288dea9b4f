"""The parameter-group builder: model + optim/freeze config -> an audited `Plan` (plan.py) of optimizer groups.

Two steps. `describe_parameters` describes every parameter on its own (`ParamInfo`): its stage (timm's
`group_matcher(coarse=True)`: the stem, then stages or blocks) and layer (`coarse=False`, for layer-wise
LR decay), decay or not, the epoch from which it trains (0: always; None: never; later: gradual
unfreezing) and the factors whose product is its peak LR. `_gather` then puts parameters with equal
descriptions into one named group, in model order. Every group carries an explicit `lr` and
`weight_decay`, so the schedule is a plain multiplier and every ratio (head 10x, layer decay, lr_mult)
survives any schedule: timm's own layer decay stores an `lr_scale` that only timm's schedulers read.
Groups that never train are listed too (lr 0) so the plan accounts for every parameter exactly once; they
are kept out of the optimizer. Groups that thaw later are in the optimizer from step 0; the loop keeps
them still until their epoch. freeze.bn is decided in one place, `_batch_norm_policy`.

No-decay is decided by module type and tensor shape (norm layers, biases, any tensor of rank <= 1) plus
the names the model itself declares in `no_weight_decay()` (ViT position embeddings and class tokens).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Sequence

from timm.models import group_parameters
from timm.models._manipulate import group_with_matcher  # what group_parameters calls; not re-exported
from torch import nn

from ..errors import FinetuneError
from ..recipe.schema import FreezeConfig, OptimConfig
from .plan import ParamGroup, Plan, check_coverage

NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES += (nn.RMSNorm,)
BATCH_NORM = nn.modules.batchnorm._BatchNorm  # SyncBatchNorm and timm's BatchNormAct2d included

Phases = tuple[tuple[int, int], ...]  # (first epoch, stages frozen from then on)
EvalNorms = tuple[tuple[str, int | None], ...]  # (BatchNorm layer held in eval mode, epoch it thaws or None)


@dataclass(frozen=True)
class ParamInfo:
    """One parameter, described on its own; parameters whose descriptions differ only in name and size
    share a group."""
    name: str
    numel: int
    label: str  # the part its group is named after: "head", "backbone", "stage2" or (layer decay) "layer5"
    stage: int | None  # body stage; None in the head
    layer: int | None  # body layer; None in the head
    decay: bool  # weight decay applies: not a norm, bias or other rank <= 1 tensor, nor in no_weight_decay()
    trains_from: int | None  # first epoch (0-based) it trains; None: never
    bn: str  # its BatchNorm layer's mode: "train", "eval", "eval until epoch 2"; "-": not BatchNorm's
    factors: dict[str, float]  # its peak LR is their product (its group shows none, and lr 0, if it never trains)
    lr_mult: tuple[str, ...]  # the optim.lr_mult globs that match it; they also name its group


def build_plan(model: nn.Module, optim: OptimConfig, freeze: FreezeConfig, head: Sequence[str] = ()) -> Plan:
    """Describe every parameter, then gather equal descriptions into named groups, in model order. `head`:
    model.head, the head's module or parameter names (empty: the model's head_names, else get_classifier)."""
    params, phases, eval_norms = describe_parameters(model, optim, freeze, head)
    groups = _gather(params, optim.weight_decay)
    if not any(g.trainable for g in groups):
        raise FinetuneError("the freeze settings leave no parameter to train (freeze.patterns froze the head too?); "
                            "`finetune plan RECIPE` shows what is frozen.")
    first: dict[int, str] = {}  # body stage -> its first parameter, to name the stages in the table
    for p in params:
        if p.stage is not None:
            first.setdefault(p.stage, p.name)
    notes = () if hasattr(model, "group_matcher") else (
        "no group_matcher (timm's) on this model: the body is one stage and one layer, so freeze.stages, "
        "freeze.phases and optim.layer_decay have nothing to split",)
    plan = Plan(groups, phases, freeze.batch_norm(), eval_norms, tuple(first[s] for s in sorted(first)), notes)
    check_coverage(plan, model)
    return plan


def describe_parameters(model: nn.Module, optim: OptimConfig, freeze: FreezeConfig,
                        head_names: Sequence[str] = ()) -> tuple[list[ParamInfo], Phases, EvalNorms]:
    """Every parameter's ParamInfo in model order, the unfreezing phases, and the BatchNorm layers the loop
    holds in eval mode. Raises FinetuneError for freeze settings or globs that do not fit this model."""
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    head = _head_names(model, head_names)
    body = [n for n in names if n not in head]
    stage_of = _dense_ids(model, body, coarse=True)
    layer_of = _dense_ids(model, body, coarse=False)
    top_layer = max(layer_of.values(), default=0)
    phases = _phases(freeze, max(stage_of.values(), default=-1) + 1)
    no_decay = _no_decay_names(model)
    pinned = set().union(*_match(freeze.patterns, names, "freeze.patterns").values())
    mult_matches = _match(list(optim.lr_mult), names, "optim.lr_mult")

    def part_from(name: str, stage: int | None) -> int | None:
        """When the part `name` (a parameter, or a BatchNorm's running_mean) sits in trains, before any
        BatchNorm rule. freeze.patterns match buffers too, so a pattern that freezes a layer holds its statistics."""
        if any(fnmatch.fnmatchcase(name, g) for g in freeze.patterns):
            return None
        if stage is None:  # the head
            return 0
        return next((e for e, n in phases if stage >= n), None)  # the first phase that leaves the stage unfrozen

    part = {n: part_from(n, stage_of.get(n)) for n in names}
    # Groups follow stages only where stages differ in when they train; otherwise one "backbone".
    split_stages = len({part[n] for n in body if n not in pinned}) > 1

    # A BatchNorm layer sits in a frozen part until all its affine parameters have thawed; one without any
    # (affine=False) sits where its running statistics do.
    stats_stage = _statistics_stages(model, head, stage_of)
    norms: dict[str, tuple[int | None, list[str]]] = {}
    for m_name, module in model.named_modules():
        if isinstance(module, BATCH_NORM):
            affine = [_join(m_name, p) for p, _ in module.named_parameters(recurse=False)]
            if affine:
                starts = [part[n] for n in affine]
            elif m_name in stats_stage:
                starts = [part_from(_join(m_name, "running_mean"), stats_stage[m_name])]
            else:
                continue  # no affine, no running statistics: train and eval mode compute the same
            norms[m_name] = (None if None in starts else max(starts), affine)
    batch_norm, eval_norms = _batch_norm_policy(freeze.batch_norm(), norms, part, pinned)

    params = []
    for name, param in named:
        trains_from, bn = batch_norm.get(name, (part[name], "-"))
        factors = {"optim.lr": optim.lr}
        stage: int | None = None
        layer: int | None = None
        if name in head:
            label = "head"
            factors["head_lr_mult"] = optim.head_lr_mult
        else:
            stage, layer = stage_of[name], layer_of[name]
            label = f"layer{layer}" if optim.layer_decay else f"stage{stage}" if split_stages else "backbone"
            if optim.layer_decay:
                factors["layer_decay"] = optim.layer_decay ** (top_layer - layer)
        globs = tuple(g for g in optim.lr_mult if name in mult_matches[g])
        factors.update({f"lr_mult[{g}]": optim.lr_mult[g] for g in globs})
        params.append(ParamInfo(name, param.numel(), label, stage, layer, name not in no_decay, trains_from, bn,
                                factors, globs))
    return params, tuple(phases), eval_norms


def _batch_norm_policy(policy: str, norms: dict[str, tuple[int | None, list[str]]], part: dict[str, int | None],
                       pinned: set[str]) -> tuple[dict[str, tuple[int | None, str]], EvalNorms]:
    """freeze.bn, in one place. `norms`: every BatchNorm layer -> (epoch the frozen part it sits in thaws,
    0 when it sits in none, None never; its affine parameters). `part`: when each parameter's part trains;
    `pinned`: the parameters freeze.patterns froze. Returns each affine parameter's (epoch it trains from,
    its layer's mode), and the layers the loop holds in eval mode with the epoch they thaw (None: never)."""
    affine: dict[str, tuple[int | None, str]] = {}
    eval_norms = []
    for norm, (thaw, names) in norms.items():
        # eval and frozen keep a frozen part's running statistics as loaded, so it computes the same function
        # on any number of devices and at any batch size; train lets them follow the batches.
        held = policy != "train" and thaw != 0
        if held:
            eval_norms.append((norm, thaw))
        mode = "train" if not held else "eval" if thaw is None else f"eval until epoch {thaw}"
        for name in names:
            # train and eval let the affine learn inside a frozen part (it absorbs a domain shift); frozen
            # keeps it as loaded, and a pattern freezes whatever it matches.
            affine[name] = (part[name] if policy == "frozen" or name in pinned else 0, mode)
    return affine, tuple(eval_norms)


def _gather(params: list[ParamInfo], weight_decay: float) -> tuple[ParamGroup, ...]:
    """One group per name (part, no_decay, lr_mult globs, when it trains), in order of first appearance."""
    members: dict[str, list[ParamInfo]] = {}
    for p in params:
        name = (p.label + ("" if p.decay else ".no_decay") + "".join(f"[{g}]" for g in p.lr_mult)
                + (".frozen" if p.trains_from is None else f".from{p.trains_from}" if p.trains_from else ""))
        members.setdefault(name, []).append(p)
    groups = []
    for name, ps in members.items():
        first = ps[0]
        if any((p.decay, p.trains_from, p.factors) != (first.decay, first.trains_from, first.factors) for p in ps):
            raise RuntimeError(f"group {name}: parameters with different settings (a bug in the group name)")
        trains = first.trains_from is not None
        stages, layers = {p.stage for p in ps}, {p.layer for p in ps}
        groups.append(ParamGroup(
            name=name, params=tuple(p.name for p in ps), numel=sum(p.numel for p in ps),
            lr=math.prod(first.factors.values()) if trains else 0.0,
            weight_decay=weight_decay if first.decay and trains else 0.0, trainable=trains,
            factors=dict(first.factors) if trains else {}, stage=first.stage if len(stages) == 1 else None,
            layer=first.layer if len(layers) == 1 else None, trains_from=first.trains_from,
            bn="/".join(sorted({p.bn for p in ps} - {"-"}) or ["-"])))
    return tuple(groups)


def _statistics_stages(model: nn.Module, head: set[str], stage_of: dict[str, int]) -> dict[str, int | None]:
    """Affine-less BatchNorm layer with running statistics -> the body stage they sit in (None: the head).

    timm's group_matcher regexes match module paths, so they place a buffer as they place a parameter, but
    timm groups parameters only. running_mean is therefore grouped together with every parameter (the
    parameters' own stages stay as `_dense_ids` found them) and takes the deepest body stage in or before
    its matcher group: the stage of its own group's parameters, or, alone in its group, the stage it
    follows (unmatched names sort last, as timm does for unmatched parameters)."""
    stats = {m: _join(m, "running_mean") for m, module in model.named_modules()
             if isinstance(module, BATCH_NORM) and getattr(module, "running_mean", None) is not None
             and not any(True for _ in module.parameters(recurse=False))}
    if not stats or not hasattr(model, "group_matcher"):
        return {m: None if s in head else 0 for m, s in stats.items()}
    names = [(n, None) for n, _ in model.named_parameters()] + [(s, None) for s in stats.values()]
    ids = group_with_matcher(names, model.group_matcher(coarse=True), reverse=True)
    return {m: None if s in head else max((stage for n, stage in stage_of.items() if ids[n] <= ids[s]), default=0)
            for m, s in stats.items()}


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


def _join(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _head_names(model: nn.Module, declared: Sequence[str] = ()) -> set[str]:
    """The head's parameters and buffers, by name: those under the names `declared` (model.head) or the
    model's own `head_names`, else timm's get_classifier()."""
    prefixes = list(declared) or list(getattr(model, "head_names", None) or [])
    if prefixes:
        names = [n for n, _ in (*model.named_parameters(), *model.named_buffers())]
        found = {p: {n for n in names if n == p or n.startswith(p + ".")} for p in prefixes}
        missing = [p for p, hit in found.items() if not hit]
        if missing:
            where = "model.head" if declared else "the model's head_names"
            listed = ", ".join(repr(p) for p in missing)
            raise FinetuneError(f"{where}: {listed} name{'s' if len(missing) == 1 else ''} no module or parameter "
                                f"of {type(model).__name__} (parameters look like {names[0]!r}, {names[-1]!r}); "
                                "give module names such as 'fc' or 'head.proj'.")
        return set().union(*found.values())
    if not hasattr(model, "get_classifier"):
        raise FinetuneError(f"finetune cannot tell which part of {type(model).__name__} is the head (it learns "
                            "optim.head_lr_mult times faster): name it in the recipe, model.head: [fc], or give the "
                            "module a head_names attribute (a list of module names), or timm's get_classifier().")
    head = model.get_classifier()
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(t) for t in (*head.parameters(), *head.buffers())}
    return {n for n, t in (*model.named_parameters(), *model.named_buffers()) if id(t) in ids}


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
