"""Export an m > 1 BOFT adapter as an exactly equivalent m = 1 adapter that stock PEFT loads on any machine.

Why: stock PEFT without its CUDA extension ``fbd_cuda`` (every CPU machine, many GPU ones) builds ``boft_R`` with
one butterfly factor whatever ``boft_n_butterfly_factor`` says, so an m > 1 adapter fails to load there
(shape ``(m, N, b, b)`` in the file, ``(1, N, b, b)`` expected).

The maths (docs/design.md, "Maths"; conventions checked against peft 0.21.2 ``peft/tuners/boft/layer.py``):

- PEFT's m = 1 path: ``boft_P`` is ``block_butterfly_perm(..., n_butterfly_factor=0)`` = the identity, so the
  rotation is ``B = block_diag(Q_0 .. Q_{K-1})`` with ``Q_k = cayley_batch(boft_R[0, k])``:
  ``S = (R - R^T) / 2``, ``Q = solve(I + S, I - S, left=False)`` i.e. ``Q (I + S) = I - S``, i.e.
  ``Q = (I - S)(I + S)^-1`` (= ``(I + S)^-1 (I - S)``: ``S`` and ``I + S`` commute), in float32.
  Linear: ``y = (base(x @ B) - bias) * boft_s + bias``; Conv2d: ``W' = (B W^T)^T * boft_s``, same ``B``.
- The composed m-factor rotation ``B = B_{m-1} .. B_0`` is exactly block-diagonal with ``K = N / 2**(m-1)`` blocks
  ``Q_k`` of size ``Be = b * 2**(m-1)`` (:func:`boft_plugin.ops.butterfly.compose_effective_blocks`).
- Each ``Q_k`` is orthogonal with det +1. Solving ``Q (I + S) = I - S`` for ``S``: ``(I + Q) S = I - Q``, so
  ``S = (I + Q)^-1 (I - Q) = (I - Q)(I + Q)^-1`` (they commute), skew-symmetric, defined iff ``-1`` is not an
  eigenvalue of ``Q``. ``boft_R := S`` gives ``(R - R^T)/2 = S`` exactly, hence PEFT's m = 1 path reproduces ``B``.
  ``boft_s`` and any bias / modules_to_save tensors are unchanged; the safetensors keys are unchanged.

Accuracy: PEFT evaluates the Cayley map in float32 and its solve has a forward error of about
``eps32 * ||I + S||``. With ``lambda`` an eigenvalue of ``Q``, ``S`` has eigenvalues ``-i tan(theta/2)``, so
``max|S| ~ 2 / min|1 + lambda|`` and the float32 reconstruction error grows like ``~1e-7 / min|1 + lambda|``
(measured; docs/single_factor.md). The converter therefore recomputes, per block, exactly what stock PEFT
will compute (float32 Cayley of the float32-stored ``S``) and refuses, naming the module and block, when that
differs from the float64 composed ``Q`` by more than ``atol`` (default 1e-6), and also whenever
``min|1 + lambda| < min_dist`` (default 0.05: a rotation angle above ~177 degrees in some plane), see
``DEFAULT_MIN_DIST``. Small rotations are far from it (randn*0.1 factors: min|1 + lambda| >= 1.4 over a 576-wide
layer for b <= 8, m <= 4), but large ones get there: randn*0.3 factors with Be >= 32 already reach 0.007.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import SingleFactorError
from .butterfly import cayley, compose_effective_blocks

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_MIN_DIST",
    "BlockCheck",
    "SingleFactorError",
    "composed_blocks",
    "peft_cayley_float32",
    "single_factor_blocks",
    "skew_preimage",
]

DEFAULT_ATOL = 1e-6  # max |PEFT's float32 Cayley(S) - Q| over a block's entries (Q has unit-norm rows)
# min |1 + lambda(Q_k)| accepted whatever the measured round trip says: for a generic orientation of the near-half-turn
# plane PEFT's float32 Cayley error is ~1e-7 / min|1 + lambda| (measure_eig.py), so 0.05 bounds it by ~2e-6 on any
# machine; an axis-aligned half turn happens to round-trip exactly on the CPU (S ~ 1e16 is structurally benign there),
# which is not a property to rely on for a file. 0.05 = a rotation angle of ~177.1 degrees in some plane.
DEFAULT_MIN_DIST = 0.05
ROUND_TRIP_ATOL_F64 = 1e-10  # float64 Cayley(S) vs Q: a sanity check of the preimage itself


def composed_blocks(boft_r: Tensor) -> Tensor:
    """Effective blocks of the rotation of ``boft_r`` in float64.

    Args:
        boft_r: ``(m, N, b, b)`` PEFT layout (any float dtype).

    Returns:
        ``(K, Be, Be)`` float64, ``K = N / 2**(m-1)``, ``Be = b * 2**(m-1)``; block ``k`` of ``B = B_{m-1}..B_0``.
    """
    return compose_effective_blocks(cayley(boft_r.detach().to("cpu", torch.float64)))


def skew_preimage(q: Tensor) -> Tensor:
    """Inverse Cayley map ``S = (I - Q)(I + Q)^-1`` (so that ``Q = (I - S)(I + S)^-1``).

    Args:
        q: ``(..., n, n)`` orthogonal, float64.

    Returns:
        ``(..., n, n)`` skew-symmetric float64 (antisymmetrised to remove rounding); non-finite or huge where
        ``Q`` has an eigenvalue at or near ``-1``.
    """
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    s, info = torch.linalg.solve_ex(eye + q, eye - q)  # an exact half turn makes I + Q singular: no error, NaN
    s = torch.where((info != 0).reshape(*info.shape, 1, 1), torch.full_like(s, math.nan), s)
    return 0.5 * (s - s.transpose(-1, -2))


def peft_cayley_float32(s: Tensor) -> Tensor:
    """Exactly what stock PEFT's ``cayley_batch`` computes from a stored ``boft_R = s``: ``(..., n, n)`` float32."""
    data = s.to(torch.float32)
    skew = 0.5 * (data - data.transpose(-1, -2))
    eye = torch.eye(data.shape[-1], dtype=torch.float32).expand_as(data)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


@dataclass
class BlockCheck:
    """Numbers of one conversion: worst block over the layer."""

    min_dist_to_minus_one: float  # min over blocks of min |1 + lambda(Q_k)| (= smallest singular value of I + Q_k)
    max_abs_s: float
    round_trip_f64: float  # max |cayley64(S) - Q|
    round_trip_f32: float  # max |PEFT float32 cayley(float32(S)) - Q|


def single_factor_blocks(
    boft_r: Tensor,
    atol: float = DEFAULT_ATOL,
    name: str = "boft_R",
    out_dtype: torch.dtype | None = None,
    min_dist: float = DEFAULT_MIN_DIST,
) -> tuple[Tensor, BlockCheck]:
    """Single-factor ``boft_R`` whose m = 1 Cayley blocks reproduce the m-factor rotation of ``boft_r``.

    Args:
        boft_r: ``(m, N, b, b)`` (m >= 1).
        atol: largest accepted ``max |PEFT float32 Cayley(S) - Q|`` over the entries of each block.
        min_dist: smallest accepted ``min |1 + lambda|`` over the eigenvalues of each composed block.
        name: what to call the tensor in errors (e.g. its safetensors key).
        out_dtype: dtype of the result (default: ``boft_r``'s dtype, at least float32).

    Returns:
        (``(1, K, Be, Be)`` skew-symmetric blocks ``S_k``, :class:`BlockCheck`).

    Raises:
        SingleFactorError: naming the tensor, the block, ``min |1 + lambda|`` and the round-trip error, when a
            block's rotation has an eigenvalue too close to -1 for a float32 Cayley preimage.
    """
    if boft_r.dim() != 4 or boft_r.shape[-1] != boft_r.shape[-2]:
        raise SingleFactorError(f"{name}: expected (m, N, b, b), got {tuple(boft_r.shape)}")
    m, n_blocks, b, _ = boft_r.shape
    if n_blocks % 2 ** (m - 1):
        raise SingleFactorError(f"{name}: N={n_blocks} blocks do not split into groups of 2**(m-1)={2 ** (m - 1)}")
    if not torch.isfinite(boft_r).all():
        raise SingleFactorError(f"{name}: boft_R holds NaN/Inf values")
    if out_dtype is None:
        out_dtype = torch.promote_types(boft_r.dtype, torch.float32)
    q = composed_blocks(boft_r)  # (K, Be, Be) float64
    k, be, _ = q.shape
    eye = torch.eye(be, dtype=torch.float64)
    dist = torch.linalg.svdvals(eye + q).amin(-1)  # I + Q is normal: singular values are |1 + lambda|
    with torch.no_grad():
        s = skew_preimage(q)
    finite = torch.isfinite(s).flatten(1).all(-1)
    s_safe = torch.where(finite[:, None, None], s, torch.zeros_like(s))
    err64 = (2 * torch.linalg.inv(eye + s_safe) - eye - q).abs().flatten(1).amax(-1)
    stored = s_safe.to(out_dtype)
    err32 = (peft_cayley_float32(stored).double() - q).abs().flatten(1).amax(-1)
    err32 = torch.where(finite, err32, torch.full_like(err32, math.inf))
    bad = (~finite) | (err64 > ROUND_TRIP_ATOL_F64) | (err32 > atol) | (dist < min_dist)
    if bad.any():
        worst = int(torch.argmin(torch.where(bad, dist, torch.full_like(dist, math.inf))))
        angle = math.degrees(2 * math.acos(min(1.0, dist[worst].item() / 2)))
        raise SingleFactorError(
            f"{name}: effective block {worst} of {k} (size {be}) has an eigenvalue near -1: it rotates some plane "
            f"by {angle:.2f} degrees (min |1 + lambda| = {dist[worst].item():.3g}, accepted >= {min_dist:g}; "
            f"{int(bad.sum())} block(s) affected). Its single-factor Cayley preimage has max|S| = "
            f"{s[worst].abs().max().item():.3g} and PEFT's float32 Cayley map reproduces the block to "
            f"{err32[worst].item():.3g} (accepted <= {atol:g}). Such a rotation has no reliable m=1 form; keep the "
            "m>1 adapter (load it with boft_plugin, or stock PEFT where fbd_cuda builds), or export a merged model"
        )
    check = BlockCheck(
        min_dist_to_minus_one=float(dist.min()),
        max_abs_s=float(s.abs().max()),
        round_trip_f64=float(err64.max()),
        round_trip_f32=float(err32.max()),
    )
    return stored.unsqueeze(0), check
