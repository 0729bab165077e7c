"""The output scale of a BOFT layer, ``y = (r - b) * s + b``, with an exact and memory-light gradient of ``s``.

``y = (r - b) * s + b`` per output column (PEFT's ``Linear.forward``: ``result - bias``, ``* boft_s``, ``+ bias``),
computed as ``torch.lerp(b, r, s)``: one rounding in bf16/fp16 (PEFT's three ops round three times), and exactly
``r`` at ``s == 1`` (the initial value), exactly ``b`` at ``s == 0``.

What backward needs for ``d s`` is the centred base output ``c = r - b``. Recovering it from the output alone as
``(y - b) / s`` is NaN at ``s == 0`` and loses ``~ ulp(y) / |s|`` elsewhere; saving ``r`` always is exact but costs
one extra ``tokens x out`` activation in every layer whose output the next op also saves (Llama: v_proj,
gate_proj, up_proj), +17.5 to +19.6 % peak memory on the benchmark model (measured, benchmarks/RESULTS.md). So the
caller says which one to save, and nothing here reads a value on the host (no device sync in the hot path):

* ``save_output=True`` (the caller knows that every ``|s| >= SMALL_SCALE``, from the numerics guard's last check:
  :mod:`boft_plugin.tuner.numerics`) and the output has ``r``'s dtype: save ``y``, the tensor returned, which the
  next op usually saves too, so no extra memory. ``c = (y - b) / s`` with ``|s| >= 0.5`` is within ~2-3 roundings
  of ``y`` of what PEFT saves (PEFT's ``c = fl(r - b)`` is itself one rounding away from exact).
* otherwise: save ``r`` itself; exact at any ``s``, 0 included.

Non-finite values are not checked here: the numerics guard checks every adapter once per optimizer step.
"""

from __future__ import annotations

import torch
from torch import Tensor

SMALL_SCALE = 0.5  # |s| below this: save r for d s (recovery from y would lose up to (1 + 1/|s|) roundings)

__all__ = ["SMALL_SCALE", "scale_shift"]


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    acc = torch.float32
    for dtype in dtypes:
        acc = torch.promote_types(acc, dtype)
    return acc


class _ScaleShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r: Tensor, s: Tensor, b: Tensor | None, out_dtype: torch.dtype, save_output: bool) -> Tensor:
        acc = _acc_dtype(r.dtype, s.dtype, *(() if b is None else (b.dtype,)))
        one_dtype = s.dtype == r.dtype and (b is None or b.dtype == r.dtype)
        if b is None:
            y = r * s  # promotes to acc when s is wider (PEFT's type promotion)
        elif one_dtype:
            # b + s (r - b) with ONE rounding (bf16/fp16 lerp computes in float); exactly r at s = 1, b at s = 0
            y = torch.lerp(b, r, s)
        else:
            # autocast / fp32 adapter on a low-precision base: PEFT's type promotion, computed in acc
            s_acc = s.to(acc)
            y = torch.addcmul(b.to(acc) * (1 - s_acc), r, s_acc)
        y = y.to(out_dtype)

        ctx.r_dtype = r.dtype
        ctx.saved_output = bool(save_output and out_dtype == r.dtype and ctx.needs_input_grad[1])
        if not ctx.needs_input_grad[1]:
            ctx.save_for_backward(None, s, b)
        elif ctx.saved_output:
            ctx.save_for_backward(y, s, b)
        else:
            ctx.save_for_backward(r, s, b)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved, s, b = ctx.saved_tensors
        acc = _acc_dtype(grad.dtype, s.dtype, *(() if b is None else (b.dtype,)))
        lead = tuple(range(grad.dim() - 1))
        grad_r = grad_s = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_r = torch.mul(grad, s).to(ctx.r_dtype)  # in the wider dtype, like autograd on PEFT's expression
        if ctx.needs_input_grad[1]:
            if b is None and ctx.saved_output:
                total = torch.mul(saved.to(acc), grad).sum(lead)  # one product, no copy of y
            else:
                centered = saved.to(acc, copy=True)
                if b is not None:
                    centered.sub_(b.to(acc))
                total = centered.mul_(grad).sum(lead)
                del centered
            grad_s = (total / s.to(acc) if ctx.saved_output else total).to(s.dtype)
        if b is not None and ctx.needs_input_grad[2]:
            grad_b = (grad.to(acc).sum(lead) * (1 - s.to(acc))).to(b.dtype)
        return grad_r, grad_s, grad_b, None, None


def scale_shift(
    r: Tensor, s: Tensor, b: Tensor | None, out_dtype: torch.dtype | None = None, save_output: bool = False
) -> Tensor:
    """``(r - b) * s + b`` per output column; exact ``d s`` at any ``s`` (0 included) unless ``save_output``.

    Args:
        r: ``(..., out)`` base-layer output (bias included), any float dtype.
        s: ``(out,)`` scale; NOT cast by the caller (fp32 master under autocast / PEFT's adapter upcast).
        b: ``(out,)`` bias or None, not cast either.
        out_dtype: dtype of the result (the base layer's output dtype, as LoRA returns); default
            ``promote(r, s, b)``, or ``r``'s dtype when that is float32 and ``s`` has ``r``'s dtype.
        save_output: every ``|s| >= SMALL_SCALE`` is known: backward recovers ``r - b`` from the returned tensor
            instead of keeping ``r`` (no extra activation when the next op saves the output too).

    Returns:
        ``(..., out)`` in ``out_dtype``.
    """
    if out_dtype is None:
        out_dtype = _acc_dtype(r.dtype, s.dtype, *(() if b is None else (b.dtype,)))
        if out_dtype == torch.float32 and r.dtype == s.dtype:
            out_dtype = r.dtype
    return _ScaleShift.apply(r, s, b, out_dtype, save_output)
