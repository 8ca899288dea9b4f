"""finetune/training/parts.py: what a checkpoint holds of a session comes back exactly, in finetune 0.1's
format too, and nothing of it is unpickled beyond tensors and plain containers."""

from __future__ import annotations

import os
import pickle
import random
from types import SimpleNamespace

import pytest
import torch

from finetune.training.parts import read_parts, write_parts


class OneProcess:
    is_main_process = True
    process_index = 0
    scaler = None

    def unwrap_model(self, model, keep_torch_compile=True):
        return model


def session(seed: int = 0, ema: bool = False) -> SimpleNamespace:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    return SimpleNamespace(model=model, optimizer=opt, ema=torch.nn.Sequential(model) if ema else None)


def test_weights_optimizer_and_moving_average_come_back(tmp_path):
    saved = session(0, ema=True)
    write_parts(OneProcess(), tmp_path, saved)
    fresh = session(1, ema=True)
    read_parts(OneProcess(), tmp_path, fresh)
    for a, b in zip(saved.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    for p_saved, p_fresh in zip(saved.model.parameters(), fresh.model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved.optimizer.state[p_saved][key], fresh.optimizer.state[p_fresh][key])
    assert sorted(os.listdir(tmp_path)) == ["ema.safetensors", "model.safetensors", "optimizer.safetensors",
                                            "rng_0.safetensors"]


def test_optimizer_moments_of_channels_last_weights_keep_their_layout(tmp_path):
    """safetensors stores tensors contiguous; a fused AdamW walks a channels_last weight and its moments in
    step, so moments restored in another layout pair the wrong elements (found: a resume diverged)."""
    write_parts(OneProcess(), tmp_path, session(0))
    fresh = session(1)
    read_parts(OneProcess(), tmp_path, fresh)
    weight = fresh.model[0].weight
    assert fresh.optimizer.state[weight]["exp_avg"].stride() == weight.stride() != (27, 9, 3, 1)


def test_rng_states_come_back(tmp_path):
    torch.manual_seed(5)
    random.seed(5)
    write_parts(OneProcess(), tmp_path, session(0))
    torch.manual_seed(5)  # session() drew from the generator after seeding: draw from the saved state
    random.seed(5)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(7)
    random.seed(7)
    read_parts(OneProcess(), tmp_path, session(1))
    torch.manual_seed(5)
    random.seed(5)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["optimizer.bin", "custom_checkpoint_0.pkl"])
def test_finetune_0_1_checkpoints_are_read_with_the_restricted_unpickler(tmp_path, name):
    """finetune 0.1 let Accelerate pickle the optimizer and the EMA: such a checkpoint still resumes, but a
    pickle that names anything beyond tensors and plain containers is refused, not run."""
    saved = session(0, ema=True)
    write_parts(OneProcess(), tmp_path, saved)
    (tmp_path / "optimizer.safetensors").unlink()
    torch.save(saved.optimizer.state_dict(), tmp_path / "optimizer.bin")
    torch.save(saved.ema.state_dict(), tmp_path / "custom_checkpoint_0.pkl")
    fresh = session(3, ema=True)
    read_parts(OneProcess(), tmp_path, fresh)
    assert torch.equal(fresh.ema[0][0].weight, saved.ema[0][0].weight)
    assert torch.equal(fresh.optimizer.state[fresh.model[0].weight]["exp_avg"],
                       saved.optimizer.state[saved.model[0].weight]["exp_avg"])
    marker = tmp_path / "ran"
    (tmp_path / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(pickle.UnpicklingError):
        read_parts(OneProcess(), tmp_path, session(4, ema=True))
    assert not marker.exists()
