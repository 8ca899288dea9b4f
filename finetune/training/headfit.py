"""The head fitted in full batches by L-BFGS: the linear probe that starts a fine-tune (train.head_init:
probe, LP-FT) and each epoch of optim.name=lbfgs, a logistic regression of the head on cached features.
Both draw the features through features.py; one fit function serves both.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from accelerate import Accelerator

from ..data.samples import IGNORE_LABEL
from ..data.splits import Splits
from ..recipe.schema import RecipeConfig
from .faults import NonFiniteLoss
from .features import Extraction, split_features, weights_digest
from .inputs import Place

if TYPE_CHECKING:
    from .session import Session

PROBE_L2 = 1e-2  # the probe head's L2 on the mean loss: best of 3e-3, 1e-2, 3e-2 on flowers17 (docs/linear-probes.md)


def start_head(s: Session, config: RecipeConfig, splits: Splits, accelerator: Accelerator,
               log: Callable[[str], None]) -> list[dict]:
    """train.head_init probe (LP-FT, Kumar et al., ICLR 2022): before the body trains, fit the new head as
    an L2-regularised logistic regression on the pretrained body's features of the training images (eval
    transform, computed once and cached like a linear probe's), so the first updates of the body follow a
    head that already separates the classes rather than a zero one, and the pretrained features are not
    pulled around while the head catches up. Returns the unreadable files met (none without a probe)."""
    if s.head_init != "probe":
        return []
    network = s.network
    training = network.training
    network.eval()
    place = Place.of(accelerator)
    source = Extraction(network, weights_digest(network), s.inputs, s.loading, place)
    view, bad = split_features(source, s.eval_view(splits.train, splits.train_indices, "train"), 1, config.data,
                               config.train.seed, log)
    keep = view.labels != IGNORE_LABEL
    x, y = view.features[keep, 0].to(place.device), view.labels[keep].to(place.device)
    head = network.get_classifier()
    fit_head(head, lambda: torch.nn.functional.cross_entropy(head(x), y) + PROBE_L2 / 2 * head.weight.pow(2).sum())
    with torch.no_grad():
        for p in head.parameters():
            p.grad = None
            p.copy_(accelerator.reduce(p.detach().clone(), reduction="mean"))  # identical on every process
        accuracy = (head(x).argmax(-1) == y).float().mean().item()
    network.train(training)
    if s.ema is not None:
        s.ema.set(s.network)  # the average starts from the fitted head too
    log(f"head initialised by a linear probe on the pretrained features (train.head_init=probe): "
        f"{100 * accuracy:.1f}% of the training images right before the body trains")
    return bad


def fit_head(head: torch.nn.Module, objective: Callable[[], torch.Tensor],
             optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """One full-batch L-BFGS fit of a head (strong-Wolfe line search): the probe before fine-tuning and an
    epoch of optim.name=lbfgs both fit this way. Returns the loss at every point the line search evaluated;
    the last is where the fit ends."""
    optimizer = optimizer or torch.optim.LBFGS(list(head.parameters()), lr=1.0, max_iter=100, history_size=20,
                                               line_search_fn="strong_wolfe")
    evaluated = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        evaluated.append(float(loss.detach()))
        return loss
    optimizer.step(closure)
    return evaluated


def fit_epoch_lbfgs(s: Session, accelerator: Accelerator, epoch: int, update: int,
                    fault_hint: str = "") -> Iterator[tuple[int, float]]:
    """optim.name=lbfgs: one epoch is one L-BFGS step (up to LBFGS_ITERATIONS iterations with a strong-Wolfe
    line search) on the L2-regularised loss over every cached training view: a logistic regression of
    the head that converges in seconds, as CLIP-style linear probes fit theirs. Every process holds all
    the features and runs the same full-batch fit without collectives; the heads are then averaged, so
    float differences between devices cannot build up. Yields once, like train_epoch does per update."""
    head = accelerator.unwrap_model(s.model).train()
    data = s.train_set.dataset
    views = data.features.shape[1]
    x = data.features.reshape(-1, data.features.shape[-1]).to(accelerator.device)
    y = data.labels.repeat_interleave(views).to(accelerator.device)
    named = dict(s.network.named_parameters())
    decayed = [(named[n], g.weight_decay) for g in s.plan.groups if g.trainable and g.weight_decay for n in g.params]

    evaluated = fit_head(head, lambda: s.criterion(head(x), y) + sum(wd / 2 * p.pow(2).sum() for p, wd in decayed),
                         s.optimizer)
    loss = evaluated[-1]
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"the L-BFGS fit of epoch {epoch + 1} reached a loss of {loss}. {fault_hint}")
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(accelerator.reduce(p.detach().clone(), reduction="mean"))
    yield update + 1, loss
