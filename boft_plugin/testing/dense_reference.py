"""Slow dense reference twin of :mod:`boft_plugin.ops.butterfly`, for tests only.

It follows PEFT's construction literally (dense ``n x n`` permutation matrices, ``torch.block_diag`` per factor,
products of dense matrices), so the fast path can be compared against it. Never use it in training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.butterfly import cayley


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
    """Dense rotation from ``boft_R`` of shape ``(m, N, b, b)`` (Cayley blocks, then the dense products)."""
    return dense_rotation_from_blocks(cayley(boft_r))


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
