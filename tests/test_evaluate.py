"""finetune/training/evaluate.py: per-sample results over a loader, and metrics from them. (Every image
counted once over several processes: test_distributed.py's validation test.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from finetune.data.samples import IGNORE_LABEL
from finetune.tasks import SingleLabel
from finetune.training.evaluate import evaluate, predict_all


class OneProcess:
    """The accelerator's part in scoring, on one process: gathering returns what it is given."""

    @staticmethod
    def gather_for_metrics(values):
        return values


LOGITS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.fixture
def scored():
    model = torch.nn.Identity()  # "images" are the logits themselves
    session = SimpleNamespace(model=model, runtime=SimpleNamespace(channels_last=False), eval_augment=None,
                              metrics={}, task=SingleLabel())
    loader = [(LOGITS[:2], torch.tensor([0, 2])), (LOGITS[2:], torch.tensor([2, IGNORE_LABEL]))]
    return session, loader


def test_per_sample_results_in_loader_order(scored):
    session, loader = scored
    results = predict_all(session, OneProcess(), loader)
    probs = LOGITS.softmax(-1)
    assert results["pred"].tolist() == [0, 1, 2, 0]
    assert results["label"].tolist() == [0, 2, 2, IGNORE_LABEL]
    assert torch.allclose(results["given_prob"][:3], probs[[0, 1, 2], [0, 2, 2]])
    assert torch.allclose(results["loss"][:3], -probs[[0, 1, 2], [0, 2, 2]].log())
    assert results["loss"][3] == 0  # an unreadable image's slot adds nothing
    assert results["top_k"][:, 0].tolist() == results["pred"].tolist()  # 3 classes: all three, best first
    assert torch.allclose(results["top_k_prob"], probs.sort(dim=-1, descending=True).values)


def test_metrics_leave_out_unreadable_images(scored):
    session, loader = scored
    metrics = evaluate(session, OneProcess(), loader, ["a", "b", "c"])
    assert metrics["val_images"] == 3 and metrics["val_acc"] == pytest.approx(2 / 3, abs=1e-6)
    assert metrics["val_per_class_acc"] == {"a": 1.0, "b": None, "c": 0.5}


def test_metrics_of_ones_own_get_the_whole_splits_logits_and_only_then(scored):
    session, loader = scored
    assert "logits" not in predict_all(session, OneProcess(), loader)  # C numbers an image: kept only when asked
    seen = []

    def margin(logits, targets):
        seen.append((logits.clone(), targets.clone()))
        return (logits.max(-1).values - logits.min(-1).values).mean()

    session.metrics = {"margin": margin}
    metrics = evaluate(session, OneProcess(), loader, ["a", "b", "c"], prefix="ema_val")
    logits, targets = seen[0]
    assert torch.equal(logits, LOGITS[:3]) and targets.tolist() == [0, 2, 2]  # the unreadable image left out
    assert metrics["ema_val_margin"] == pytest.approx(2.0) and metrics["ema_val_acc"] == pytest.approx(2 / 3, abs=1e-6)
