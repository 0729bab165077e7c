"""Fast BOFT maths in pure torch: Cayley blocks, butterfly permutations as reshapes, effective blocks.

Notation (docs/design.md, "Maths"): an adapted layer of input width ``n`` has ``m`` butterfly factors of ``N``
blocks of size ``b`` (``n = N * b``). Factor ``i`` is ``B_i = P_i D_i P_i^T`` with ``D_i`` the block-diagonal
of its ``N`` Cayley blocks and ``P_i`` PEFT's block-butterfly permutation. The rotation ``B = B_{m-1} ... B_0``
is exactly block-diagonal with ``K = N / 2**(m-1)`` *effective blocks* of size ``Be = b * 2**(m-1)``;
everything here works on those ``(K, Be, Be)`` blocks and never builds an ``n x n`` tensor.

Row-vector convention, as in PEFT: activations are rows, the layer computes ``x @ B``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "application_group",
    "butterfly_perm",
    "group_blocks",
    "cayley",
    "compose_effective_blocks",
    "effective_block_size",
    "multiplicative_dropout",
    "permute_last_dim",
    "rotate_activations",
    "rotate_weight",
    "unpermute_last_dim",
]


def effective_block_size(block_size: int, n_factors: int) -> int:
    """Size ``b * 2**(m-1)`` of the dense diagonal blocks of the composed rotation."""
    return block_size * 2 ** (n_factors - 1)


def _split_for_factor(n: int, factor: int, block_size: int) -> tuple[int, int, int]:
    """Shape ``(chunks, 2**factor, b/2)`` that factor ``factor``'s butterfly permutation transposes around 2."""
    half = block_size // 2
    group = 2**factor
    return n // (2 * group * half), group, half


def permute_last_dim(x: Tensor, factor: int, block_size: int) -> Tensor:
    """Return ``x[..., perm]`` for the butterfly permutation of factor ``factor`` (``x @ P^T``), as a reshape.

    ``perm = arange(n).view(c, 2**i, 2, b/2).transpose(1, 2).reshape(n)``; for factor 0 it is the identity.
    The permutation is periodic with period ``b * 2**factor``, so ``n`` may be the whole width or one
    effective block.
    """
    if factor == 0:
        return x
    *lead, n = x.shape
    chunks, group, half = _split_for_factor(n, factor, block_size)
    return x.reshape(*lead, chunks, group, 2, half).transpose(-3, -2).reshape(*lead, n)


def unpermute_last_dim(x: Tensor, factor: int, block_size: int) -> Tensor:
    """Inverse of :func:`permute_last_dim`: ``x[..., argsort(perm)]`` (``x @ P``)."""
    if factor == 0:
        return x
    *lead, n = x.shape
    chunks, group, half = _split_for_factor(n, factor, block_size)
    return x.reshape(*lead, chunks, 2, group, half).transpose(-3, -2).reshape(*lead, n)


def butterfly_perm(n: int, block_num: int, block_size: int, factor: int, n_factors: int) -> Tensor:
    """Index vector of PEFT's ``block_butterfly_perm(n, N / 2**factor, b / 2, m - 1)`` (identity for m = 1).

    Row ``r`` of PEFT's permutation matrix ``P`` has its 1 in column ``perm[r]``. Used by tests and the dense
    reference; the fast path applies the same permutation with :func:`permute_last_dim`.
    """
    if n != block_num * block_size:
        raise ValueError(f"n={n} must equal block_num*block_size={block_num * block_size}")
    if n_factors == 1:
        return torch.arange(n)
    return permute_last_dim(torch.arange(n), factor, block_size)


def cayley(weight: Tensor) -> Tensor:
    """Orthogonal Cayley blocks ``Q = (I - S)(I + S)^-1`` with ``S = (R - R^T) / 2``.

    Args:
        weight: ``(..., b, b)`` free parameters (``boft_R``).

    Returns:
        ``(..., b, b)`` orthogonal blocks in float32 (float64 stays float64), whatever ``weight``'s dtype and any
        active autocast: low-precision solves are not accurate enough for an orthogonal factor.
    """
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=weight.device.type, enabled=False):
        r = weight.to(work_dtype)
        skew = 0.5 * (r - r.transpose(-1, -2))
        eye = torch.eye(r.shape[-1], dtype=work_dtype, device=r.device)
        # PEFT solves Q (I + S) = I - S. Since I - S = 2 I - (I + S), Q = 2 (I + S)^-1 - I: one batched inverse
        # (I + S is always invertible for a real skew S, its singular values are >= 1), fewer ops in backward.
        return 2 * torch.linalg.inv(eye + skew) - eye


def multiplicative_dropout(blocks: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """PEFT's ``MultiplicativeDropoutLayer`` with PEFT's exact random draws (same seed, same dropped blocks).

    PEFT draws, on the default CPU generator: ``factor = randint(0, m)``, then ``perm = randperm(N)``, and replaces
    block ``i`` of that factor by the identity iff ``perm[i] < k`` with ``k = int(p * N)`` (it indexes a mask *by*
    the permutation). Both draws happen even when ``k == 0``, so the random stream stays in step with PEFT's.

    Args:
        blocks: ``(m, N, b, b)`` orthogonal blocks.
        p: fraction of one factor's blocks to drop.

    Returns:
        ``(m, N, b, b)``, a new tensor; ``blocks`` is returned unchanged when nothing is dropped.
    """
    m, n_blocks, b, _ = blocks.shape
    n_drop = int(p * n_blocks)
    factor = int(torch.randint(0, m, (1,), generator=generator).item())
    perm = torch.randperm(n_blocks, generator=generator)
    if n_drop == 0:
        return blocks
    device = blocks.device
    mask = torch.zeros(m, n_blocks, 1, 1, dtype=torch.bool, device=device)
    mask[factor] = (perm < n_drop).to(device).view(n_blocks, 1, 1)
    eye = torch.eye(b, dtype=blocks.dtype, device=device)
    return torch.where(mask, eye, blocks)


def _block_diagonal_within(blocks: Tensor, per_block: int) -> Tensor:
    """``(K * g, b, b)`` blocks -> ``(K, g*b, g*b)``: each run of ``g`` blocks placed on one block diagonal."""
    n_blocks, b, _ = blocks.shape
    k = n_blocks // per_block
    grouped = blocks.reshape(k, per_block, b, b).permute(0, 2, 3, 1)  # (K, b, b, g)
    dense = torch.diag_embed(grouped)  # (K, b, b, g, g), zero off the g-diagonal
    return dense.permute(0, 3, 1, 4, 2).reshape(k, per_block * b, per_block * b)


_POSITIONS: dict[tuple[int, int, str], Tensor] = {}


def _factor_positions(block_size: int, n_factors: int, device: torch.device) -> Tensor:
    """Where each factor's blocks land inside one effective block: ``(m, g*b*b)`` flat indices into ``Be x Be``.

    Factor ``i`` is ``F_i = P D P^T`` with ``F_i[r, c] = D[perm[r], perm[c]]``, so element ``(p, q)`` of its block
    ``j`` lands at row ``inv[j*b + p]``, column ``inv[j*b + q]`` (``inv`` the inverse local permutation).
    Cached per geometry and device, and built outside ``torch.inference_mode`` so that a first call under
    inference mode (PEFT's merge tests, ``generate``) does not leave an index autograd later refuses to save.
    """
    key = (block_size, n_factors, str(device))
    cached = _POSITIONS.get(key)
    if cached is not None:
        return cached
    with torch.inference_mode(False):
        positions = _build_positions(block_size, n_factors, device)
    _POSITIONS[key] = positions
    return positions


def _build_positions(block_size: int, n_factors: int, device: torch.device) -> Tensor:
    b, per = block_size, 2 ** (n_factors - 1)
    be = b * per
    j, p, q = torch.meshgrid(torch.arange(per), torch.arange(b), torch.arange(b), indexing="ij")
    rows = []
    for factor in range(n_factors):
        inverse = torch.argsort(permute_last_dim(torch.arange(be), factor, b))
        rows.append((inverse[j * b + p] * be + inverse[j * b + q]).reshape(-1))
    return torch.stack(rows).to(device)


def compose_effective_blocks(blocks: Tensor) -> Tensor:
    """Compose the ``m`` sparse factors into the effective blocks of ``B = B_{m-1} ... B_0``.

    Each factor is scattered into dense ``Be x Be`` effective blocks in one op (its permutation folded into the
    scatter positions) and chained with a batched matmul: few, efficient kernels instead of many small permutes,
    and never more than three ``n x Be`` tensors alive at once.

    Args:
        blocks: ``(m, N, b, b)`` orthogonal factor blocks.

    Returns:
        ``(N / 2**(m-1), Be, Be)`` with ``Be = b * 2**(m-1)``; block ``k`` of ``B`` equals ``E[k]``, in the
        dtype of ``blocks`` (autocast does not lower it). Cost ``O(m * n * Be**2)``, independent of the tokens.
    """
    m, n_blocks, b, _ = blocks.shape
    if m == 1:
        return blocks[0]
    per = 2 ** (m - 1)
    k, be = n_blocks // per, b * per
    positions = _factor_positions(b, m, blocks.device)
    values = blocks.reshape(m, k, per * b * b)

    def dense(factor: int) -> Tensor:
        where = positions[factor].expand(k, per * b * b)
        empty = torch.zeros(k, be * be, dtype=blocks.dtype, device=blocks.device)
        return empty.scatter(-1, where, values[factor]).view(k, be, be)

    with torch.autocast(device_type=blocks.device.type, enabled=False):
        composed = dense(m - 1)
        for factor in range(m - 2, -1, -1):
            composed = torch.bmm(composed, dense(factor))
        return composed


def application_group(n_blocks: int, block: int, min_width: int) -> int:
    """How many consecutive blocks to merge so that one application block is at least ``min_width`` wide.

    A power of two dividing ``n_blocks`` (1 when ``block >= min_width``). Batched matmuls of 8- or 16-wide blocks
    run far below the machine's matmul rate; a few structural zeros buy back that efficiency.
    """
    group = 1
    while block * group < min_width and n_blocks % (2 * group) == 0:
        group *= 2
    return group


def group_blocks(effective_blocks: Tensor, group: int) -> Tensor:
    """``(K, Be, Be)`` -> ``(K / group, group * Be, group * Be)``: runs of ``group`` blocks on one diagonal."""
    if group == 1:
        return effective_blocks
    return _block_diagonal_within(effective_blocks, group)


def rotate_activations(x: Tensor, effective_blocks: Tensor) -> Tensor:
    """``x @ B`` as one batched block matmul.

    Args:
        x: ``(..., n)`` activations.
        effective_blocks: ``(K, Be, Be)`` with ``K * Be = n``, already in ``x``'s dtype.

    Returns:
        ``(..., n)``.
    """
    k, be, _ = effective_blocks.shape
    lead = x.shape[:-1]
    out = torch.einsum("tkb,kbc->tkc", x.reshape(-1, k, be), effective_blocks)
    return out.reshape(*lead, k * be)


def rotate_weight(weight: Tensor, effective_blocks: Tensor, inverse: bool = False) -> Tensor:
    """Merge-style rotation of a linear weight.

    Args:
        weight: ``(out, n)`` in ``nn.Linear`` layout.
        effective_blocks: ``(K, Be, Be)``.
        inverse: ``False`` gives ``W B^T`` (merge: ``x @ B @ W^T == x @ (W B^T)^T``); ``True`` gives ``W B``
            (unmerge, since ``B`` is orthogonal).

    Returns:
        ``(out, n)`` in the dtype of the blocks.
    """
    k, be, _ = effective_blocks.shape
    w = weight.reshape(weight.shape[0], k, be).to(effective_blocks.dtype)
    pattern = "okb,kbc->okc" if inverse else "okb,kcb->okc"
    return torch.einsum(pattern, w, effective_blocks).reshape(weight.shape[0], k * be)
