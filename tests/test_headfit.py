"""finetune/training/headfit.py: one full-batch L-BFGS fit serves the probe and lbfgs epochs."""

from __future__ import annotations

import torch

from finetune.training.headfit import fit_head


def test_a_full_batch_fit_converges_to_the_separating_head():
    torch.manual_seed(0)
    x = torch.randn(200, 5)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    head = torch.nn.Linear(5, 2)
    evaluated = fit_head(head, lambda: torch.nn.functional.cross_entropy(head(x), y) + 1e-3 * head.weight.pow(2).sum())
    assert evaluated[-1] < 0.5 * evaluated[0]  # the loss where the fit ends is far below where it started
    assert (head(x).argmax(-1) == y).float().mean() > 0.97
    direction = head.weight[1] - head.weight[0]
    assert direction[0] > direction[1] > 0 and direction[0] > 5 * direction[2:].abs().max()


def test_the_fit_steps_the_optimizer_it_is_given():
    """An lbfgs epoch passes the run's optimizer (its state is saved in checkpoints), not a new one."""
    head = torch.nn.Linear(3, 2)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=3)
    x, y = torch.randn(20, 3), torch.randint(2, (20,))
    fit_head(head, lambda: torch.nn.functional.cross_entropy(head(x), y), optimizer)
    assert optimizer.state[optimizer._params[0]]["func_evals"] >= 1  # it stepped this one
