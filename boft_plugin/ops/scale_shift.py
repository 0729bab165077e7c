"""The output scale of a BOFT layer, ``y = (r - b) * s + b``, with an exact and memory-light gradient of ``s``.

``y = (r - b) * s + b`` per output column (PEFT's ``Linear.forward``: ``result - bias``, ``* boft_s``, ``+ bias``),
computed as ``torch.lerp(b, r, s)``: one rounding in bf16/fp16 (PEFT's three ops round three times), and exactly
``r`` at ``s == 1`` (the initial value), exactly ``b`` at ``s == 0``.

What backward needs for ``d s`` is the centred base output ``c = r - b``. Recovering it from the output alone as
``(y - b) / s`` is NaN at ``s == 0`` and loses ``~ ulp(y) / |s|`` elsewhere; saving ``r`` always is exact but costs
one extra ``tokens x out`` activation in every layer whose output the next op also saves (Llama: v_proj,
gate_proj, up_proj), +17.5 to +19.6 % peak memory on the benchmark model (measured, benchmarks/RESULTS.md). This
version is exact *and* free in the usual case:

* same dtype in and out (fp32 / fp64 / pure bf16 / fp16 training, FSDP2 ``param_dtype``): save ``y`` (the tensor
  returned, which the next op usually saves too, so no extra memory) **plus the columns of ``r`` whose
  ``|s| < SMALL_SCALE``**. For those columns ``c`` is exact; for the others ``c = (y - b) / s`` with ``|s| >= 0.5``
  is within ~2-3 roundings of ``y`` of what PEFT saves (PEFT's ``c = fl(r - b)`` is itself one rounding away from
  exact). While ``s`` stays away from 0 (it starts at 1) nothing extra is saved.
* output wider than the base output (``torch.autocast``: ``r`` bf16, ``s``/``b``/``x`` fp32): compute ``y`` in the
  wide dtype like PEFT's type promotion does, and save ``r`` itself (narrow: same bytes the snapshot saved, a bf16
  ``y``); exact at any ``s``.
* under ``torch.compile``: save ``r`` (no data-dependent branch).

Also a numerics guard: a non-finite ``boft_s`` raises :class:`NonFiniteScaleError` (a ``FloatingPointError``; the
layer can re-raise it as ``BoftNumericsError`` naming the adapter). The finiteness check and the small-``s`` count
share one host sync.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import NonFiniteScaleError

SMALL_SCALE = 0.5  # |s| below this: keep the exact r columns for d s (recovery error <= ~(1 + 1/|s|) roundings)

__all__ = ["NonFiniteScaleError", "SMALL_SCALE", "scale_shift"]


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    acc = torch.float32
    for dtype in dtypes:
        acc = torch.promote_types(acc, dtype)
    return acc


def _scale_stats(s: Tensor, need_small: bool) -> tuple[int, bool]:
    """(number of non-finite entries, whether any |s| < SMALL_SCALE) with a single host sync.

    ``aminmax`` of ``|s|``: the max is NaN/Inf iff some entry is (NaN propagates), the min says whether any is
    small; the exact non-finite count is only computed when there is one (for the error message).
    """
    if s.numel() == 0:
        return 0, False
    low, high = torch.stack(torch.aminmax(s.detach().abs())).tolist()
    bad = 0 if math.isfinite(high) else int((~torch.isfinite(s)).sum())
    return bad, need_small and low < SMALL_SCALE


class _ScaleShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r: Tensor, s: Tensor, b: Tensor | None, out_dtype: torch.dtype, check: bool) -> Tensor:
        acc = _acc_dtype(r.dtype, s.dtype, *(() if b is None else (b.dtype,)))
        s_acc = s.to(acc)
        need_s_grad = ctx.needs_input_grad[1]
        need_small = need_s_grad and out_dtype == r.dtype
        n_small = False
        if (check or need_small) and not torch.compiler.is_compiling():
            n_bad, n_small = _scale_stats(s, need_small)  # one host sync for both
            if check and n_bad:
                raise NonFiniteScaleError(f"boft_s has {n_bad} NaN/Inf value(s) of {s.numel()}")

        one_dtype = s.dtype == r.dtype and (b is None or b.dtype == r.dtype)
        if b is None:
            y = r * s  # promotes to acc when s is wider (PEFT's type promotion)
        elif one_dtype:
            # b + s (r - b) with ONE rounding (bf16/fp16 lerp computes in float); exactly r at s = 1, b at s = 0
            y = torch.lerp(b, r, s)
        else:
            # autocast / fp32 adapter on a low-precision base: PEFT's type promotion, computed in acc
            y = torch.addcmul(b.to(acc) * (1 - s_acc), r, s_acc)
        y = y.to(out_dtype)

        ctx.r_dtype, ctx.has_bias = r.dtype, b is not None
        ctx.mode = "none"
        if need_s_grad:
            if out_dtype != r.dtype or torch.compiler.is_compiling():
                ctx.mode = "r"  # autocast: r is the narrow tensor, y is not shared with anything narrower
                ctx.save_for_backward(r, s, b)
            elif n_small:
                ctx.mode = "y+cols"
                cols = torch.nonzero(s.abs() < SMALL_SCALE).squeeze(-1)
                ctx.save_for_backward(y, s, b, cols, r.index_select(-1, cols))
            else:
                ctx.mode = "y"
                ctx.save_for_backward(y, s, b)
        else:
            ctx.save_for_backward(None, s, b)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved = ctx.saved_tensors
        s, b = saved[1], saved[2]
        acc = _acc_dtype(grad.dtype, s.dtype, *(() if b is None else (b.dtype,)))
        lead = tuple(range(grad.dim() - 1))
        grad_r = grad_s = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_r = torch.mul(grad, s).to(ctx.r_dtype)  # in the wider dtype, like autograd on PEFT's expression
        if ctx.needs_input_grad[1]:
            b_acc = None if b is None else b.to(acc)
            s_acc = s.to(acc)
            if ctx.mode == "r":
                centered = saved[0].to(acc, copy=True)
                if b_acc is not None:
                    centered.sub_(b_acc)
                grad_s = centered.mul_(grad).sum(lead)
            else:
                y = saved[0]
                if b_acc is None:
                    total = torch.mul(y.to(acc), grad).sum(lead)  # one product, no copy of y
                else:
                    centered = y.to(acc, copy=True)
                    total = centered.sub_(b_acc).mul_(grad).sum(lead)
                    del centered
                if ctx.mode == "y+cols":
                    cols, r_cols = saved[3], saved[4]
                    small = torch.zeros_like(s_acc, dtype=torch.bool).index_fill_(0, cols, True)
                    grad_s = total / torch.where(small, torch.ones_like(s_acc), s_acc)
                    exact = r_cols.to(acc, copy=True)
                    if b_acc is not None:
                        exact.sub_(b_acc.index_select(0, cols))
                    exact = exact.mul_(grad.index_select(-1, cols)).sum(lead)
                    grad_s = grad_s.index_copy(0, cols, exact)
                else:
                    grad_s = total / s_acc
            grad_s = grad_s.to(s.dtype)
        if b is not None and ctx.needs_input_grad[2]:
            grad_b = (grad.to(acc).sum(lead) * (1 - s.to(acc))).to(b.dtype)
        return grad_r, grad_s, grad_b, None, None


def scale_shift(
    r: Tensor, s: Tensor, b: Tensor | None, out_dtype: torch.dtype | None = None, check: bool = True
) -> Tensor:
    """``(r - b) * s + b`` per output column; exact ``d s`` at any ``s`` (0 included), memory-light.

    Args:
        r: ``(..., out)`` base-layer output (bias included), any float dtype.
        s: ``(out,)`` scale; NOT cast by the caller (fp32 master under autocast / PEFT's adapter upcast).
        b: ``(out,)`` bias or None, not cast either.
        out_dtype: dtype of the result (the layer's input dtype, as PEFT's ``result.to(previous_dtype)``);
            default ``promote(r, s, b)``.
        check: raise :class:`NonFiniteScaleError` on a NaN/Inf ``s``.
    """
    if out_dtype is None:
        out_dtype = _acc_dtype(r.dtype, s.dtype, *(() if b is None else (b.dtype,)))
        if out_dtype == torch.float32 and r.dtype == s.dtype:
            out_dtype = r.dtype
    return _ScaleShift.apply(r, s, b, out_dtype, check)
