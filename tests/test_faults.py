"""finetune/training/faults.py: a fault on any process stops every process at the same update."""

from __future__ import annotations

import math

import pytest

from finetune import FinetuneError
from finetune.training.faults import NonFiniteLoss, stop_on_fault


def test_exception_on_one_process_names_it_and_the_update():
    with pytest.raises(FinetuneError, match=r"stopped at update 4: process 1 \(of 2\) raised") as info:
        stop_on_fault([0.5, 0.0], [1], 3, None, "hint")
    assert info.value.raised_on_every_process


def test_non_finite_loss_names_the_process_and_the_update():
    with pytest.raises(NonFiniteLoss, match=r"update 8: the loss is inf on process 0 \(of 2\)"):
        stop_on_fault([math.inf, 0.5], [], 7, None, "hint")


def test_finite_losses_pass():
    stop_on_fault([0.5, 0.7], [], 7, None, "hint")
