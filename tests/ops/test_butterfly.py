"""The butterfly ops (Cayley blocks, permutations, composition, rotation, dropout) against their slow twins in
boft_plugin.ops.reference and PEFT's own code, values and gradients in float64."""

import pytest
import torch
from peft.tuners.boft.layer import BOFTLayer

from boft_plugin.ops import butterfly as ops
from boft_plugin.ops import reference as ref
from boft_plugin.tuner.rotation import effective_blocks_from

# (width, block size, factors): powers of two, a non-power of two (1376 = 2**5 * 43), odd half-blocks (b = 6).
GEOMETRIES = [(32, 2, 3), (64, 4, 2), (64, 8, 1), (128, 8, 4), (48, 6, 2), (1376, 4, 4), (1376, 86, 2), (256, 2, 6)]


@pytest.mark.parametrize("width,block,factors", GEOMETRIES)
def test_permutation_indices_equal_peft(width, block, factors):
    n_blocks = width // block
    for i in range(factors):
        peft_perm = BOFTLayer.block_butterfly_perm(None, width, n_blocks // 2**i, block // 2, factors - 1)
        assert torch.equal(ops.butterfly_perm(width, n_blocks, block, i, factors), peft_perm)
        assert torch.equal(ref.peft_block_butterfly_perm(width, n_blocks // 2**i, block // 2, factors - 1), peft_perm)


@pytest.mark.parametrize("width,block,factors", GEOMETRIES)
def test_permute_reshapes_are_inverse_gathers(width, block, factors):
    x = torch.randn(3, width)
    for i in range(factors):
        perm = ops.butterfly_perm(width, width // block, block, i, max(factors, 2))
        assert torch.equal(ops.permute_last_dim(x, i, block), x[:, perm])
        assert torch.equal(ops.unpermute_last_dim(x, i, block), x[:, torch.argsort(perm)])


@pytest.mark.parametrize("width,block,factors", GEOMETRIES)
def test_effective_blocks_equal_dense_product(width, block, factors):
    torch.manual_seed(0)
    blocks = ops.cayley(0.3 * torch.randn(factors, width // block, block, block, dtype=torch.float64))
    dense = ref.dense_rotation_from_blocks(blocks)
    eff = ops.compose_effective_blocks(blocks)
    size = ops.effective_block_size(block, factors)
    assert eff.shape == (width // size, size, size)
    # The block-diagonal fact: the dense product is zero outside the effective blocks and equal inside.
    assert torch.allclose(torch.block_diag(*eff), dense, atol=1e-13, rtol=0)
    # Orthogonality of B.
    eye = torch.eye(size, dtype=torch.float64)
    assert torch.allclose(eff @ eff.transpose(-1, -2), eye.expand_as(eff), atol=1e-12, rtol=0)


@pytest.mark.parametrize("width,block,factors", GEOMETRIES[:6])
def test_activation_and_weight_rotation_values_and_gradients(width, block, factors):
    torch.manual_seed(1)
    weight = (0.2 * torch.randn(factors, width // block, block, block, dtype=torch.float64)).requires_grad_()
    x = torch.randn(2, 5, width, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, width, dtype=torch.float64)

    def fast(r, xx):
        eff = ops.compose_effective_blocks(ops.cayley(r))
        return ops.rotate_activations(xx, eff), ops.rotate_weight(w, eff), ops.rotate_weight(w, eff, inverse=True)

    def dense(r, xx):
        rot = ref.dense_rotation(r)
        return xx @ rot, w @ rot.T, w @ rot

    outs_fast, outs_dense = fast(weight, x), dense(weight, x)
    for a, b in zip(outs_fast, outs_dense):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    grads_fast = torch.autograd.grad(sum((o * o.detach().sin()).sum() for o in outs_fast), (weight, x))
    grads_dense = torch.autograd.grad(sum((o * o.detach().sin()).sum() for o in outs_dense), (weight, x))
    for a, b in zip(grads_fast, grads_dense):
        assert torch.allclose(a, b, atol=1e-11, rtol=0)


def test_cayley_matches_peft_and_is_orthogonal():
    torch.manual_seed(2)
    r = torch.randn(12, 8, 8, dtype=torch.float64)
    q = ops.cayley(r)
    peft_q = BOFTLayer.cayley_batch(None, r)
    assert torch.allclose(q, peft_q, atol=1e-14, rtol=0)
    assert torch.allclose(q @ q.transpose(-1, -2), torch.eye(8, dtype=torch.float64).expand_as(q), atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cayley_runs_in_float32_for_low_precision_and_under_autocast(dtype):
    r = torch.randn(2, 4, 8, 8).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = ops.cayley(r)
        eff = ops.compose_effective_blocks(q)
    assert q.dtype == torch.float32 and eff.dtype == torch.float32
    assert torch.allclose(q @ q.transpose(-1, -2), torch.eye(8).expand_as(q), atol=1e-5)


def test_multiplicative_dropout_replaces_blocks_of_one_factor_with_identity():
    torch.manual_seed(3)
    q = ops.cayley(torch.randn(3, 10, 4, 4))
    dropped = ops.multiplicative_dropout(q, 0.3)
    is_eye = (dropped == torch.eye(4)).all(dim=(-1, -2))
    changed = (dropped != q).any(dim=(-1, -2))
    assert changed.sum() == 3 and torch.equal(changed, is_eye)
    assert changed.any(dim=1).sum() == 1  # all dropped blocks in one factor
    assert ops.multiplicative_dropout(q, 0.05) is q  # int(0.05 * 10) == 0 blocks: nothing dropped


def test_butterfly_perm_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="must equal"):
        ops.butterfly_perm(30, 4, 8, 0, 2)


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


def test_the_reference_cayley_is_pefts_own():
    torch.manual_seed(1)
    r = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    peft = BOFTLayer.cayley_batch(None, r.reshape(-1, 6, 6)).reshape(r.shape)
    assert torch.allclose(ref.peft_cayley(r), peft, atol=1e-14)
