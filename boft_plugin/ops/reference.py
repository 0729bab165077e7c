"""Slow reference twins of the fast ops, for tests and benchmarks only (never used in training).

Each follows PEFT's construction literally, written independently of the fast code it checks:

- :func:`peft_cayley` twins :func:`.butterfly.cayley` (PEFT's ``solve(I + S, I - S, left=False)``);
- :func:`peft_block_butterfly_perm` / :func:`perm_matrix` twin :func:`.butterfly.permute_last_dim` (PEFT's
  sort-block loop, dense ``n x n`` permutation matrices);
- :func:`dense_rotation` twins :func:`.butterfly.compose_effective_blocks` + :func:`.butterfly.rotate_activations`
  (``torch.block_diag`` per factor, products of dense matrices);
- :func:`plain_scale_shift` twins :func:`.scale_shift.scale_shift` (PEFT's three ops under plain autograd);
- :func:`dense_boft_linear` twins a whole ``BoftLinear`` forward;
- :func:`low_rank_error_reference` twins :meth:`.low_rank.Spectrum.relative_error` (``B @ A`` formed densely).
"""

from __future__ import annotations

import torch
from torch import Tensor


def peft_cayley(weight: Tensor) -> Tensor:
    """PEFT's ``cayley_batch``: ``S = (R - R^T) / 2``, ``Q = solve(I + S, I - S, left=False)``; ``(..., b, b)``."""
    skew = 0.5 * (weight - weight.transpose(-1, -2))
    eye = torch.eye(weight.shape[-1], dtype=weight.dtype, device=weight.device).expand_as(weight)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def plain_scale_shift(r: Tensor, s: Tensor, b: Tensor | None) -> Tensor:
    """``(r - b) * s + b`` as PEFT writes it (three ops; plain autograd saves whatever it needs)."""
    if b is None:
        return r * s
    return (r - b) * s + b


def peft_block_butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> Tensor:
    """Re-statement of PEFT's ``BOFTLayer.block_butterfly_perm`` (its sort-block loop, not our reshape)."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    block_size = n // b
    indices = torch.arange(n)
    step = block_size // r
    order = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    sorted_order = torch.cat([torch.arange(int(p) * r, int(p) * r + r) for p in order])
    for start in range(0, n, block_size):
        indices[start : start + block_size] = indices[start : start + block_size][sorted_order]
    return indices


def perm_matrix(perm: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Dense permutation matrix with ``P[r, perm[r]] = 1``."""
    n = perm.numel()
    mat = torch.zeros(n, n, dtype=dtype)
    mat[torch.arange(n), perm] = 1
    return mat


def dense_rotation_from_blocks(blocks: Tensor) -> Tensor:
    """``B = B_{m-1} ... B_0`` as a dense ``(n, n)`` matrix from ``(m, N, b, b)`` orthogonal blocks."""
    m, n_blocks, b, _ = blocks.shape
    n = n_blocks * b
    rotation = None
    for i in range(m):
        perm = peft_block_butterfly_perm(n, n_blocks // 2**i, b // 2, m - 1)
        p = perm_matrix(perm, blocks.dtype).to(blocks.device)
        factor = p @ torch.block_diag(*blocks[i]) @ p.T
        rotation = factor if rotation is None else factor @ rotation
    return rotation


def dense_rotation(boft_r: Tensor) -> Tensor:
    """Dense rotation from ``boft_R`` of shape ``(m, N, b, b)`` (PEFT's Cayley blocks, then the dense products)."""
    return dense_rotation_from_blocks(peft_cayley(boft_r))


def dense_boft_linear(x: Tensor, weight: Tensor, bias: Tensor | None, boft_r: Tensor, boft_s: Tensor) -> Tensor:
    """PEFT's BOFT ``Linear.forward`` with one adapter: ``(x @ B) W^T`` scaled by ``boft_s``, bias unscaled.

    Args:
        x: ``(..., in)``; weight: ``(out, in)``; bias: ``(out,)`` or None; boft_r: ``(m, N, b, b)``;
        boft_s: ``(out, 1)``.
    """
    rotation = dense_rotation(boft_r).to(x.dtype)
    y = (x @ rotation) @ weight.T
    y = y * boft_s.squeeze(-1).to(y.dtype)
    return y if bias is None else y + bias


def low_rank_error_reference(delta: Tensor, lora_a: Tensor, lora_b: Tensor) -> float:
    """``||delta - B @ A||_F / ||delta||_F`` formed densely, float64: twins :meth:`.low_rank.Spectrum.relative_error`
    (which reads the error off the singular values)."""
    delta = delta.double()
    norm = torch.linalg.matrix_norm(delta)
    if norm == 0:
        return float(torch.linalg.matrix_norm(lora_b.double() @ lora_a.double()))
    return float(torch.linalg.matrix_norm(delta - lora_b.double() @ lora_a.double()) / norm)
