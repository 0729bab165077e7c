"""Which layers BOFT adapts, checked before anything changes: Conv2d kernels stock PEFT can and cannot represent,
quantised linear layers no PEFT quantisation backend handles (known class names, packed weights by dtype/shape)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import BOFTConfig, PeftModel, get_peft_model

import boft_plugin
from boft_plugin.stock_peft import stock_peft_boft
from boft_plugin.testing.models import max_rel_err


class Conv(torch.nn.Module):
    def __init__(self, kernel, **kwargs):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 6, kernel, **kwargs)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("kernel,padding", [(1, 0), (3, 1), (5, 2)])
@pytest.mark.parametrize("factors", [1, 2])
def test_square_kernels_move_both_ways_with_stock_peft(tmp_path, kernel, padding, factors):
    torch.manual_seed(0)
    config = dict(target_modules=["conv"], boft_block_size=4, boft_n_butterfly_factor=factors, init_weights=False)
    base = Conv(kernel, padding=padding)
    x = torch.randn(2, 8, 7, 7)
    with stock_peft_boft(multi_factor=True):
        stock = get_peft_model(copy.deepcopy(base), BOFTConfig(**config))
        expected = stock(x)
        stock.save_pretrained(tmp_path / "stock")
    boft_plugin.register()
    try:
        ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "stock")  # stock -> ours
        assert type(ours.base_model.model.conv).__module__.startswith("boft_plugin")
        assert ours.base_model.model.conv.boft_R["default"].shape == (factors, 8 * kernel**2 // 4, 4, 4)
        assert max_rel_err(ours(x), expected) < 1e-5
        ours.save_pretrained(tmp_path / "ours")
    finally:
        boft_plugin.unregister()
    with stock_peft_boft(multi_factor=True):  # ours -> stock
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        assert max_rel_err(back(x), expected) < 1e-5


@pytest.mark.parametrize("kernel,padding", [((1, 3), (0, 1)), ((3, 1), (1, 0))])
def test_non_square_kernel_refused_up_front_and_what_stock_peft_does(kernel, padding):
    config = BOFTConfig(target_modules=["conv"], boft_block_size=4)
    x = torch.randn(2, 8, 5, 5)
    # stock PEFT sizes the adapter as in_channels * kernel_size[0]**2 and fails at the first forward
    with stock_peft_boft(multi_factor=False):
        stock = get_peft_model(Conv(kernel, padding=padding), copy.deepcopy(config))
        assert stock.base_model.model.conv.boft_R["default"].shape[1] * 4 == 8 * kernel[0] ** 2
        with pytest.raises(RuntimeError, match="is invalid for input of size"):
            stock(x)
    base = Conv(kernel, padding=padding)
    boft_plugin.register()
    try:
        with pytest.raises(boft_plugin.BoftTargetError, match=r"conv: Conv2d with the non-square kernel"):
            get_peft_model(base, copy.deepcopy(config))
    finally:
        boft_plugin.unregister()
    assert type(base.conv) is torch.nn.Conv2d  # nothing was replaced


def test_conv_settings_stock_peft_computes_differently_warn_but_stay_exact(registered):
    base = Conv(3, padding=1, dilation=1, stride=(1, 2))
    x = torch.randn(2, 8, 7, 7)
    with pytest.warns(UserWarning, match=r"stride \(1, 2\).*different outputs"):
        model = get_peft_model(copy.deepcopy(base), BOFTConfig(target_modules=["conv"], boft_block_size=4))
    assert torch.allclose(model(x), base(x), atol=1e-6)  # identity adapter: exactly the base convolution


# Stand-ins with the class names and weights of bitsandbytes' layers (bitsandbytes itself needs no GPU to import,
# but is not a dependency; a machine with it runs the real classes too).
class Linear4bit(torch.nn.Linear):
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        packed = torch.zeros(in_features * out_features // 2, 1, dtype=torch.uint8)
        self.weight = torch.nn.Parameter(packed, requires_grad=False)


class Linear8bitLt(torch.nn.Linear):
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)


Linear4bit.__module__ = Linear8bitLt.__module__ = "bitsandbytes.nn.modules"


class PackedLinear(torch.nn.Linear):
    """A quantised linear of a library we do not know by name: its weight gives it away."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        packed = torch.zeros(out_features, in_features // 8, dtype=torch.int32)
        self.weight = torch.nn.Parameter(packed, requires_grad=False)


def _quantised_layers():
    # look-alikes no PEFT quantisation backend handles (real bitsandbytes layers are adapted: test_quantised.py)
    return [Linear4bit(64, 32), Linear8bitLt(64, 32), PackedLinear(64, 32)]


@pytest.mark.parametrize("layer", _quantised_layers(), ids=lambda layer: type(layer).__name__)
def test_quantised_layers_refused_before_anything_changes(registered, layer):
    base = torch.nn.Sequential(torch.nn.Linear(64, 64), layer)
    with pytest.raises(boft_plugin.BoftTargetError, match=r"- 1: .*(quantised|packed)") as info:
        get_peft_model(base, BOFTConfig(target_modules=["0", "1"], boft_block_size=4))
    assert "1 module(s)" in str(info.value)  # one error, naming the one bad layer
    assert type(base[0]) is torch.nn.Linear  # the good layer was not replaced either


def test_plain_layers_and_zero3_partitions_are_not_mistaken_for_quantised():
    from transformers.pytorch_utils import Conv1D

    from boft_plugin.tuner.targets import unsupported_reason

    zero3_like = torch.nn.Linear(8, 4)
    zero3_like.weight.data = torch.empty(0)  # what a rank holds under ZeRO-3
    zero3_like.weight.ds_shape = torch.Size([4, 8])
    for module in (torch.nn.Linear(8, 4), Conv1D(12, 8), torch.nn.Conv2d(4, 6, 3), zero3_like):
        assert unsupported_reason(module) is None, module
    with torch.device("meta"):
        assert unsupported_reason(torch.nn.Linear(8, 4)) is None
