"""Outputs and gradients equal PEFT's own BOFT maths run at m > 1 on the CPU (docs/design.md, "Oracle")."""

import pytest
import torch

from boft_plugin.stock_peft import stock_peft_boft
from boft_plugin.testing.models import MLP, build_pair, max_rel_err

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def _single_linear(width: int, out: int, bias: bool, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(width + out + bias)
    return torch.nn.Sequential(torch.nn.Linear(width, out, bias=bias)).to(dtype)


def _forward_backward(model, x, grad_out):
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(grad_out)
    layer = model.base_model.model[0]
    return y.detach(), x.grad, layer.boft_R["default"].grad, layer.boft_s["default"].grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    "width,block,factors",
    [(64, 4, 1), (64, 4, 2), (64, 4, 3), (64, 4, 4), (96, 6, 2), (1376, 4, 4), (1376, 86, 2), (1024, 16, 3)],
)
def test_linear_matches_peft_oracle(width, block, factors, bias, dtype):
    base = _single_linear(width, 40, bias, dtype)
    config = dict(target_modules=["0"], boft_block_size=block, boft_n_butterfly_factor=factors, init_weights=False)
    stock, ours = build_pair(base, config)
    assert ours.base_model.model[0].boft_R["default"].shape == (factors, width // block, block, block)
    x = torch.randn(3, 5, width, dtype=dtype)
    grad_out = torch.randn(3, 5, 40, dtype=dtype)
    with stock_peft_boft():
        expected = _forward_backward(stock, x, grad_out)
    actual = _forward_backward(ours, x, grad_out)
    for name, a, e in zip(("output", "grad x", "grad boft_R", "grad boft_s"), actual, expected):
        assert max_rel_err(a, e) < TOLERANCE[dtype], name


@pytest.mark.parametrize("factors", [1, 2, 3, 4])
def test_block_num_config_matches_peft_oracle(factors):
    base = MLP(width=64, hidden=128, out=16).double()
    config = dict(
        target_modules=["lin0", "lin1"], boft_block_size=0, boft_block_num=16, boft_n_butterfly_factor=factors
    )
    config["init_weights"] = False
    stock, ours = build_pair(base, config)
    x = torch.randn(7, 64, dtype=torch.float64)
    with stock_peft_boft():
        expected = stock(x)
    assert max_rel_err(ours(x), expected) < 1e-10


@pytest.mark.parametrize("factors", [1, 2, 3])
def test_conv2d_matches_peft_oracle(factors):
    torch.manual_seed(factors)

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv2d = torch.nn.Conv2d(16, 6, 3, padding=1)

        def forward(self, x):
            return self.conv2d(x)

    config = dict(target_modules=["conv2d"], boft_block_size=4, boft_n_butterfly_factor=factors, init_weights=False)
    stock, ours = build_pair(Conv().double(), config)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64, requires_grad=True)
    with stock_peft_boft():
        expected = stock(x)
        expected.square().sum().backward()
    expected_grad = x.grad.clone()
    x.grad = None
    actual = ours(x)
    actual.square().sum().backward()
    assert max_rel_err(actual, expected) < 1e-10
    assert max_rel_err(x.grad, expected_grad) < 1e-10
    stock_r = stock.base_model.model.conv2d.boft_R["default"]
    ours_r = ours.base_model.model.conv2d.boft_R["default"]
    assert max_rel_err(ours_r.grad, stock_r.grad) < 1e-10
