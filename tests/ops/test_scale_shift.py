"""The output scale ``(r - b) * s + b`` against its plain-autograd twin (``ops.reference.plain_scale_shift``):
values and gradients at any ``s``, saving ``r`` or (where every ``|s| >= 0.5``) the output."""

import pytest
import torch

from boft_plugin.ops.reference import plain_scale_shift
from boft_plugin.ops.scale_shift import scale_shift


def test_scale_shift_without_bias_gradients_equal_plain_autograd_at_small_and_large_scales():
    torch.manual_seed(3)
    r = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([1.0, 0.0, 0.3, -2.0, 1e-8, 0.7], dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 7, 6, dtype=torch.float64)
    fast = torch.autograd.grad(scale_shift(r, s, None), (r, s), grad)
    slow = torch.autograd.grad(plain_scale_shift(r, s, None), (r, s), grad)
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, atol=1e-13, rtol=1e-12)


@pytest.mark.parametrize("save_output", [False, True], ids=["saves-r", "saves-output"])
def test_scale_shift_gradients_match_plain_autograd(save_output):
    r = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    s = (1 + 0.2 * torch.randn(6, dtype=torch.float64)).clamp(min=0.6).requires_grad_()  # every |s| >= 0.5
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, s, b: scale_shift(r, s, b, save_output=save_output), (r, s, b))
    assert torch.autograd.gradcheck(lambda r, s: scale_shift(r, s, None, save_output=save_output), (r, s))
    assert torch.allclose(scale_shift(r, s, b), plain_scale_shift(r, s, b))
