"""Numerics against stock PEFT beyond the plain fp32 path: boft_s at and near 0, the NaN guard on boft_s (after the
optimizer step), boft_dropout with PEFT's exact random draws, bias modes and modules_to_save gradients, and the
scale-shift op alone (saving r, or the output when every |s| >= SMALL_SCALE)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import BOFTConfig, get_peft_model

import boft_plugin
from boft_plugin.ops.scale_shift import SMALL_SCALE, scale_shift
from boft_plugin.stock_peft import stock_peft_boft
from boft_plugin.testing.models import MLP, build_pair, max_rel_err

S_VALUES = (1.0, 0.7, 0.05, 1e-3, 0.0)


def _peft_expression(r, s, b, out_dtype):
    return (((r - b) * s) + b).to(out_dtype)


def _scale_case(dtype_r, dtype_s, s_value, tokens=64, out=48):
    generator = torch.Generator().manual_seed(0)
    r = torch.randn(tokens, out, generator=generator, dtype=torch.float64) * 2
    b = torch.randn(out, generator=generator, dtype=torch.float64) * 3
    s = torch.full((out,), s_value, dtype=torch.float64)
    s[::5] = 1.0 if s_value != 1.0 else 0.9
    grad = torch.randn(tokens, out, generator=generator, dtype=torch.float64)
    return r.to(dtype_r), s.to(dtype_s), b.to(dtype_s), grad


def _run(fn, r, s, b, grad):
    r, s, b = (t.clone().requires_grad_() for t in (r, s, b))
    y = fn(r, s, b)
    y.backward(grad.to(y.dtype))
    return y.detach(), r.grad, s.grad, b.grad


def test_scale_shift_gradcheck_at_every_scale_including_zero():
    for s_value in S_VALUES:
        r, s, b, _ = _scale_case(torch.float64, torch.float64, s_value, tokens=5, out=7)
        inputs = (r.requires_grad_(), s.requires_grad_(), b.requires_grad_())
        assert torch.autograd.gradcheck(lambda r, s, b: scale_shift(r, s, b), inputs)
        if s_value >= SMALL_SCALE:  # the output-saving backward, where the caller may choose it
            assert torch.autograd.gradcheck(lambda r, s, b: scale_shift(r, s, b, save_output=True), inputs)


SAVES = [(s, False) for s in S_VALUES] + [(s, True) for s in S_VALUES if s >= SMALL_SCALE]


@pytest.mark.parametrize("s_value,save_output", SAVES, ids=[f"s={s}-{'y' if o else 'r'}" for s, o in SAVES])
@pytest.mark.parametrize(
    "dtypes", [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float16,) * 2, (torch.bfloat16, torch.float32)]
)
def test_scale_shift_no_worse_than_peft_expression(dtypes, s_value, save_output):
    dtype_r, dtype_s = dtypes
    r, s, b, grad = _scale_case(dtype_r, dtype_s, s_value)
    truth = _run(lambda r, s, b: _peft_expression(r, s, b, torch.float64), r.double(), s.double(), b.double(), grad)
    peft = _run(lambda r, s, b: _peft_expression(r, s, b, dtype_r), r, s, b, grad)
    ours = _run(lambda r, s, b: scale_shift(r, s, b, dtype_r, save_output=save_output), r, s, b, grad)
    for index, name in enumerate(("y", "grad r", "grad s", "grad b")):
        assert torch.isfinite(ours[index]).all(), name
        error_peft, error_ours = max_rel_err(peft[index], truth[index]), max_rel_err(ours[index], truth[index])
        assert error_ours <= 3 * error_peft + torch.finfo(dtype_r).eps, (name, error_ours, error_peft)


def test_scale_shift_exact_at_one():
    r, s, b, _ = _scale_case(torch.bfloat16, torch.bfloat16, 1.0)
    assert torch.equal(scale_shift(r, torch.ones_like(s), b), r)
    assert torch.equal(scale_shift(r, torch.ones_like(s), b, save_output=True), r)


@pytest.mark.parametrize("factors", [1, 2])
def test_gradients_at_zero_scale_are_finite_and_equal_stock_peft(factors):
    torch.manual_seed(0)
    base = MLP()
    config = dict(
        target_modules=["lin0", "lin1"], boft_block_size=4, boft_n_butterfly_factor=factors, init_weights=False
    )
    stock, ours = build_pair(base, config)
    for model in (stock, ours):
        with torch.no_grad():
            model.base_model.model.lin0.boft_s["default"][::2] = 0.0
            model.base_model.model.lin1.boft_s["default"].fill_(0.0)
    x = torch.randn(6, 64)
    with stock_peft_boft():
        stock(x).square().sum().backward()
    ours(x).square().sum().backward()
    stock_grads = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert torch.isfinite(param.grad).all(), name
            assert max_rel_err(param.grad, stock_grads[name]) <= 1e-5, name


def _ours(init_weights=False):
    torch.manual_seed(0)
    boft_plugin.register()
    try:
        config = BOFTConfig(
            target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2, init_weights=init_weights
        )
        return get_peft_model(torch.nn.Sequential(torch.nn.Linear(32, 16)), config)
    finally:
        boft_plugin.unregister()


def test_nan_boft_s_is_caught_by_the_optimizer_step_naming_the_layer():
    model = _ours()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(5, 32)).sum().backward()
    with torch.no_grad():
        model.base_model.model[0].boft_s["default"][3] = float("nan")  # as a diverged update would leave it
    with pytest.raises(boft_plugin.BoftNumericsError, match=r"layer 0, adapter 'default': boft_s has 1 NaN/Inf"):
        optimizer.step()
    with pytest.raises(boft_plugin.BoftNumericsError, match=r"BOFT adapters of 1 layer\(s\) are not finite"):
        boft_plugin.check_numerics(model)  # the same check without an optimizer (evaluation, a custom loop)


def test_training_through_a_zero_scale_stays_finite():
    model = _ours(init_weights=True)
    with torch.no_grad():
        model.base_model.model[0].boft_s["default"][0] = 0.0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(5, 32)
    for _ in range(4):
        model(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unmerge_at_zero_scale_is_refused_instead_of_writing_nan():
    model = _ours()
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.boft_s["default"][2] = 0.0
    model.merge_adapter()
    merged = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="cannot unmerge"):
        model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, merged) and layer.merged  # left merged, nothing NaN


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = torch.nn.Linear(64, 96)
        self.lin1 = torch.nn.Linear(96, 24)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


def _dropout_pair(factors, p):
    torch.manual_seed(0)
    config = dict(
        target_modules=["lin0", "lin1"],
        boft_block_size=4,
        boft_n_butterfly_factor=factors,
        boft_dropout=p,
        init_weights=False,
    )
    stock, ours = build_pair(TwoLayers().double(), config)
    return stock.train(), ours.train()


def _train_step(model, x, grad, seed):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(grad)
    after = torch.rand(4)  # the random stream after the step
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, after


@pytest.mark.parametrize("tokens", [3, 64], ids=["checkpointed-composition", "kept-composition"])
@pytest.mark.parametrize("factors", [1, 2, 4])
def test_dropout_drops_the_same_blocks_as_peft(factors, tokens):
    stock, ours = _dropout_pair(factors, p=0.5)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 64, generator=generator, dtype=torch.float64)
    grad = torch.randn(tokens, 24, generator=generator, dtype=torch.float64)
    for seed in range(3):
        with stock_peft_boft():
            y_stock, gx_stock, g_stock, after_stock = _train_step(stock, x, grad, seed)
        y_ours, gx_ours, g_ours, after_ours = _train_step(ours, x, grad, seed)
        assert max_rel_err(y_ours, y_stock) < 1e-10 and max_rel_err(gx_ours, gx_stock) < 1e-10, seed
        assert all(max_rel_err(g_ours[name], g_stock[name]) < 1e-10 for name in g_stock), seed
        assert torch.equal(after_ours, after_stock), "random stream consumed differently"
    ours.eval()
    assert max_rel_err(ours(x), y_ours) > 1e-6  # dropout really acted in training


def test_dropout_draws_like_peft_when_nothing_is_dropped_and_with_two_adapters():
    stock, ours = _dropout_pair(1, p=0.01)  # int(0.01 * N) == 0: PEFT still draws
    x, grad = torch.randn(5, 64, dtype=torch.float64), torch.randn(5, 24, dtype=torch.float64)
    with stock_peft_boft():
        *_, after_stock = _train_step(stock, x, grad, 0)
    *_, after_ours = _train_step(ours, x, grad, 0)
    assert torch.equal(after_ours, after_stock)

    torch.manual_seed(0)
    base = TwoLayers().double()
    kw = dict(target_modules=["lin0"], boft_block_size=4, boft_dropout=0.5, init_weights=False)
    with stock_peft_boft():
        stock = get_peft_model(copy.deepcopy(base), BOFTConfig(**kw))
        stock.add_adapter("other", BOFTConfig(**kw))
    boft_plugin.register()
    try:
        ours = get_peft_model(copy.deepcopy(base), BOFTConfig(**kw))
        ours.add_adapter("other", BOFTConfig(**kw))
    finally:
        boft_plugin.unregister()
    ours.load_state_dict(stock.state_dict())
    for model in (stock, ours):
        model.base_model.set_adapter(["default", "other"])
        model.train()
    with stock_peft_boft():
        torch.manual_seed(3)
        y_stock = stock(x)
    torch.manual_seed(3)
    assert max_rel_err(ours(x), y_stock) < 1e-10


@pytest.mark.parametrize("zero_scale", [False, True])
@pytest.mark.parametrize("factors", [1, 2])
@pytest.mark.parametrize("bias", ["none", "all", "boft_only"])
def test_bias_modes_and_modules_to_save_gradients_equal_stock(bias, factors, zero_scale):
    torch.manual_seed(0)
    config = dict(
        target_modules=["lin0", "lin1"],
        boft_block_size=4,
        boft_n_butterfly_factor=factors,
        init_weights=False,
        bias=bias,
        modules_to_save=["head"],
    )
    stock, ours = build_pair(MLP().double(), config)
    if zero_scale:
        for model in (stock, ours):
            with torch.no_grad():
                model.base_model.model.lin0.boft_s["default"][::3] = 0.0
    x = torch.randn(6, 64, dtype=torch.float64)
    with stock_peft_boft():
        stock(x).square().sum().backward()
    ours(x).square().sum().backward()
    stock_grads = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert stock_grads.keys() == ours_grads.keys() and any("modules_to_save" in n for n in ours_grads)
    if bias != "none":
        assert any(n.endswith("bias") and "modules_to_save" not in n for n in ours_grads)
    for name, grad in stock_grads.items():
        assert max_rel_err(ours_grads[name], grad) < 1e-10, name
