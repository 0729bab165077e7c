"""The issue-13 speed-ups keep the maths exact: each fast op against an independent slow twin (PEFT's own Cayley
through ``torch.linalg.solve``, the dense reference product, plain autograd), values and gradients in float64."""

import pytest
import torch
from peft import BOFTConfig, get_peft_model
from peft.tuners.boft.layer import BOFTLayer

import boft_plugin
from boft_plugin.ops import butterfly as ops
from boft_plugin.ops.scale_shift import scale_shift
from boft_plugin.testing import dense_reference as ref
from boft_plugin.tuner.layer import _all_finite
from boft_plugin.tuner.rotation import effective_blocks_from


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_cayley_values_and_gradients_equal_peft_solve(scale):
    torch.manual_seed(0)
    r = (scale * torch.randn(3, 5, 8, 8, dtype=torch.float64)).requires_grad_()
    grad = torch.randn(3, 5, 8, 8, dtype=torch.float64)
    ours = ops.cayley(r)
    peft = BOFTLayer.cayley_batch(None, r.reshape(-1, 8, 8)).reshape(r.shape)  # solve(I + S, I - S, left=False)
    assert ours.is_contiguous()
    assert torch.allclose(ours, peft, atol=1e-13, rtol=0)
    (g_ours,) = torch.autograd.grad(ours, r, grad)
    (g_peft,) = torch.autograd.grad(peft, r, grad)
    assert torch.allclose(g_ours, g_peft, atol=1e-12 * max(1.0, scale), rtol=1e-10)


@pytest.mark.parametrize("width,block,factors", [(32, 4, 2), (32, 2, 3), (64, 4, 4), (48, 6, 2), (64, 2, 5)])
def test_level_composition_gradcheck_and_dense_product(width, block, factors):
    torch.manual_seed(1)
    blocks = ops.cayley(0.4 * torch.randn(factors, width // block, block, block, dtype=torch.float64))
    blocks = blocks.detach().requires_grad_()
    assert torch.autograd.gradcheck(ops.compose_effective_blocks, (blocks,), fast_mode=True)
    eff = ops.compose_effective_blocks(blocks)
    dense = ref.dense_rotation_from_blocks(blocks.detach())
    assert torch.allclose(torch.block_diag(*eff.detach()), dense, atol=1e-13, rtol=0)
    # gradients against autograd through the dense reference product (an independent construction)
    grad = torch.randn_like(eff)
    (fast,) = torch.autograd.grad(eff, blocks, grad)
    size = eff.shape[-1]
    dense = ref.dense_rotation_from_blocks(blocks)
    diagonal = [dense[k * size : (k + 1) * size, k * size : (k + 1) * size] for k in range(eff.shape[0])]
    slow_blocks = torch.stack(diagonal)
    (slow,) = torch.autograd.grad(slow_blocks, blocks, grad)
    assert torch.allclose(fast, slow, atol=1e-12, rtol=0)


@pytest.mark.parametrize("factors", [1, 2, 3, 4])
def test_autograd_keeps_what_composition_saved_rows_says(factors):
    width, block = 256, 8
    weight = torch.randn(factors, width // block, block, block, requires_grad=True)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        effective_blocks_from(weight)
    kept.pop(weight.untyped_storage().data_ptr(), None)
    assert sum(kept.values()) // 4 <= width * ops.composition_saved_rows(block, factors)


def test_rotate_activations_on_strided_input_equals_dense():
    torch.manual_seed(2)
    r = 0.3 * torch.randn(3, 16, 4, 4, dtype=torch.float64)
    x = torch.randn(64, 5, dtype=torch.float64).T.requires_grad_()  # (5, 64), not contiguous
    eff = ops.compose_effective_blocks(ops.cayley(r)).requires_grad_()
    out = ops.rotate_activations(x, eff)
    assert torch.allclose(out, x @ torch.block_diag(*eff), atol=1e-13, rtol=0)
    assert torch.autograd.gradcheck(ops.rotate_activations, (x.detach().requires_grad_(), eff), fast_mode=True)


def test_finiteness_guard_agrees_with_the_exact_check():
    blocks = ops.cayley(torch.randn(2, 8, 4, 4)).reshape(-1, 8, 8)
    weight = torch.randn(2, 8, 4, 4)
    assert _all_finite(blocks, weight)
    huge = torch.full_like(weight, 3e38)  # finite, but its sum overflows: the fast path must not decide alone
    assert _all_finite(blocks, huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = weight.clone()
        w[1, 3, 2, 0] = bad
        assert not _all_finite(blocks, w)
        b = blocks.clone()
        b[0, 1, 1] = bad
        assert not _all_finite(b, weight)
    mixed = weight.clone()
    mixed[0, 0, 0, 0], mixed[1, 0, 0, 0] = float("inf"), -float("inf")
    assert not _all_finite(blocks, mixed)


def test_huge_but_finite_boft_r_is_not_reported_as_nan():
    boft_plugin.register()
    try:
        model = get_peft_model(
            torch.nn.Sequential(torch.nn.Linear(32, 16)),
            BOFTConfig(target_modules=["0"], boft_block_size=4, boft_n_butterfly_factor=2),
        )
    finally:
        boft_plugin.unregister()
    with torch.no_grad():
        model.base_model.model[0].boft_R["default"].fill_(1e37)  # sum overflows float32, every entry is finite
    out = model(torch.randn(3, 32))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("values,message", [((float("inf"), 2), "2 NaN/Inf"), ((float("nan"), 1), "1 NaN/Inf")])
def test_scale_stats_count_non_finite_entries(values, message):
    bad, count = values
    s = torch.ones(10)
    s[:count] = bad
    with pytest.raises(FloatingPointError, match=message):
        scale_shift(torch.randn(4, 10), s, None)


def test_scale_shift_without_bias_gradients_equal_plain_autograd_at_small_and_large_scales():
    torch.manual_seed(3)
    r = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([1.0, 0.0, 0.3, -2.0, 1e-8, 0.7], dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 7, 6, dtype=torch.float64)
    fast = torch.autograd.grad(scale_shift(r, s, None), (r, s), grad)
    slow = torch.autograd.grad(r * s, (r, s), grad)
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, atol=1e-13, rtol=1e-12)
