"""finetune/training/faults.py: a fault on any process stops every process, nothing of a bad update is
applied, and the host reads the health only every few updates."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from finetune import FinetuneError
from finetune.training.faults import Health, NonFiniteLoss, stop_on_fault


def one_process():
    """The parts of an Accelerator Health uses, for one CPU process (reduce: nothing to add)."""
    return SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, scaler=None,
                           reduce=lambda tensor, reduction: tensor)


def test_exception_on_one_process_names_it_and_the_update():
    with pytest.raises(FinetuneError, match=r"stopped at update 4: process 1 \(of 2\) raised") as info:
        stop_on_fault([0.5, 0.0], [1], 3, "hint")
    # printed by the process that raised; the others stay silent
    assert info.value.reported_elsewhere and info.value.raised_on_every_process
    with pytest.raises(FinetuneError) as info:
        stop_on_fault([0.5, 0.0], [1], 3, "hint", raised_here=True)
    assert not info.value.reported_elsewhere and not info.value.raised_on_every_process


def test_non_finite_loss_names_the_process_and_the_update():
    with pytest.raises(NonFiniteLoss, match=r"update 8: the loss is inf on process 0 \(of 2\)") as info:
        stop_on_fault([math.inf, 0.5], [], 7, "hint")
    assert info.value.raised_on_every_process and not info.value.reported_elsewhere
    with pytest.raises(NonFiniteLoss, match=r"nor of the 2 updates after it"):
        stop_on_fault([math.nan], [], 7, "hint", skipped_after=2)


def test_finite_losses_pass():
    stop_on_fault([0.5, 0.7], [], 7, "hint")


def adamw(p):
    return torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, fused=True)


def test_health_is_read_every_n_updates_and_at_the_end_of_the_epoch():
    p = torch.nn.Parameter(torch.ones(3))
    watch = Health(one_process(), adamw(p), every=4)
    assert watch.every == 4
    due, read = [], []
    for update in range(10):
        watch.record(update, torch.tensor(float(update)))
        due.append(watch.due(update + 1, epoch_ended=update == 9))
        if due[-1]:
            read.append(watch.check())
    assert [u + 1 for u, d in enumerate(due) if d] == [4, 8, 10]
    assert read == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0]]


def test_check_returns_each_updates_loss_in_order():
    watch = Health(one_process(), adamw(torch.nn.Parameter(torch.ones(1))), every=50)
    for update, loss in enumerate([0.5, 0.25, 2.0]):
        watch.record(update, torch.tensor(loss))
    assert watch.check() == [0.5, 0.25, 2.0]
    assert watch.check() == []  # read once


def test_a_bad_update_and_every_later_one_are_skipped_on_the_device():
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamw(p)
    watch = Health(one_process(), opt, every=50)
    for update, loss in enumerate([1.0, math.nan, 1.0, 1.0]):
        if update == 1:
            before = p.detach().clone()
        watch.record(update, torch.tensor(loss))
        p.grad = torch.ones(3) if math.isfinite(loss) else torch.full((3,), math.nan)
        opt.step()
    assert torch.equal(p.detach(), before)  # updates 2, 3 and 4 left the weights as update 1 did
    assert opt.state[p]["step"].item() == 1  # and the moments too
    with pytest.raises(NonFiniteLoss, match=r"stopped at update 2: the loss is nan, .*nor of the 2 updates after it"):
        watch.check()


def test_optimizers_that_cannot_skip_on_the_device_are_checked_every_update():
    lbfgs = torch.optim.LBFGS([torch.nn.Parameter(torch.ones(1))])
    assert Health(one_process(), lbfgs, every=50).every == 1
    fp16 = SimpleNamespace(**{**vars(one_process()), "scaler": object()})  # GradScaler owns found_inf
    assert Health(fp16, adamw(torch.nn.Parameter(torch.ones(1))), every=50).every == 1


def test_a_failed_collective_reports_the_peer_that_raised():
    watch = Health(SimpleNamespace(**{**vars(one_process()), "num_processes": 2,
                                          "reduce": lambda t, reduction: t + torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])}),
                       adamw(torch.nn.Parameter(torch.ones(1))), every=50)
    watch.record(0, torch.tensor(0.5))  # process 1 raised in this update
    with pytest.raises(FinetuneError, match=r"update 1: process 1 \(of 2\) raised an exception") as info:
        with watch.peers():
            raise RuntimeError("Connection closed by peer")  # gloo, when process 1 exits
    assert info.value.reported_elsewhere


def test_a_request_of_any_process_is_read_by_every_process_with_the_health():
    """interrupt.py's requests (1: checkpoint, 2: stop) travel with the health; every process reads the
    largest one at the same update, so they act together."""
    other_asks = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 2.0]])  # process 1 received a stop signal
    asks = Asks(request=1)
    watch = Health(SimpleNamespace(**{**vars(one_process()), "num_processes": 2,
                                      "reduce": lambda t, reduction: t + other_asks}),
                   adamw(torch.nn.Parameter(torch.ones(1))), every=50, requests=asks)
    watch.record(0, torch.tensor(0.5))
    watch.after_update(1, epoch_ended=False)
    assert watch.requested == 0 and asks.agreed == [0]  # not read yet: the fault cadence is 50
    watch.after_update(1, epoch_ended=True)
    assert watch.requested == 2 and asks.agreed == [0, 2]


class Asks:
    """interrupt.Pauses' side of the health: a request, and reads due every `read_every` updates."""

    def __init__(self, request: int = 0, read_every: int | None = None):
        self.asked, self.read_every, self.agreed = request, read_every, []

    def request(self) -> int:
        return self.asked

    def read_due(self, updates_done: int) -> bool:
        return self.read_every is not None and updates_done % self.read_every == 0

    def agree(self, requested: int) -> None:
        self.agreed.append(requested)


def test_faults_and_requests_share_one_read_cadence():
    """A checkpoint due by count (every 3 updates) reads the health too; reads stay as few as both need."""
    watch = Health(one_process(), adamw(torch.nn.Parameter(torch.ones(1))), every=5, requests=Asks(read_every=3))
    reads = []
    for update in range(10):
        watch.record(update, torch.tensor(float(update)))
        if watch.due(update + 1, epoch_ended=update == 9):
            reads.append(update + 1)
        watch.after_update(update + 1, epoch_ended=update == 9)
    assert reads == [3, 5, 6, 9, 10]
