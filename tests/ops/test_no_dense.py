"""No tensor of in x in elements is created in a training step (forward, backward, optimizer step)."""

import pytest
import torch
from peft import BOFTConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from boft_plugin.stock_peft import stock_peft_boft

WIDTH, OUT, TOKENS = 1024, 256, 64


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


def _train_step(model) -> LargestTensor:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(TOKENS, WIDTH)
    with LargestTensor() as probe:
        model(x).square().mean().backward()
        optimizer.step()
    return probe


def _layer():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(WIDTH, OUT))


@pytest.mark.parametrize("block,factors", [(8, 1), (8, 2), (16, 4), (4, 4)])
def test_training_step_allocates_nothing_of_in_by_in(registered, block, factors):
    model = get_peft_model(
        _layer(), BOFTConfig(target_modules=["0"], boft_block_size=block, boft_n_butterfly_factor=factors)
    )
    probe = _train_step(model)
    assert probe.numel < WIDTH * WIDTH, f"{probe.op} returned {probe.numel} elements"
    # the largest tensors are the activations and the frozen weight, not the rotation
    assert probe.numel <= max(TOKENS * WIDTH, OUT * WIDTH, WIDTH * block * 2 ** (factors - 1))


def test_the_probe_sees_stock_peft_dense_rotation():
    """Control: the same probe catches stock PEFT's dense (in x in) construction."""
    with stock_peft_boft(multi_factor=True):
        model = get_peft_model(_layer(), BOFTConfig(target_modules=["0"], boft_block_size=8, boft_n_butterfly_factor=2))
        probe = _train_step(model)
    assert probe.numel >= WIDTH * WIDTH
