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
    "apply_dropout_mask",
    "butterfly_perm",
    "group_blocks",
    "cayley",
    "compose_effective_blocks",
    "composition_saved_rows",
    "dropout_mask",
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
        eye = torch.eye(r.shape[-1], dtype=work_dtype, device=r.device)
        # PEFT solves Q (I + S) = I - S. Since I - S = 2 I - (I + S), Q = 2 (I + S)^-1 - I: one batched inverse
        # (I + S is always invertible for a real skew S, its singular values are >= 1), fewer ops in backward.
        # LAPACK returns column-major inverses, so invert A^T = I - S and transpose: (A^T)^-1 ^T = A^-1 comes out
        # row-major and Q contiguous, which the composition then reads without copies. `inv_ex` without its error
        # check: `inv` reads LAPACK's `info` on the host (a device sync per call), and I + S cannot be singular.
        inverse = torch.linalg.inv_ex(torch.add(eye, r.mT - r, alpha=0.5), check_errors=False).inverse.mT
        return torch.add(-eye, inverse, alpha=2)


def dropout_mask(
    n_factors: int, n_blocks: int, p: float, device: torch.device, generator: torch.Generator | None = None
) -> Tensor | None:
    """Which blocks PEFT's ``MultiplicativeDropoutLayer`` replaces by the identity, with PEFT's exact random draws.

    PEFT draws, on the default CPU generator: ``factor = randint(0, m)``, then ``perm = randperm(N)``, and replaces
    block ``i`` of that factor by the identity iff ``perm[i] < k`` with ``k = int(p * N)`` (it indexes a mask *by*
    the permutation). Both draws happen even when ``k == 0``, so the random stream stays in step with PEFT's.
    No value is read on the host: the mask is built from the draws on the CPU and copied to ``device`` from pinned
    memory without waiting (one small asynchronous copy per call on an accelerator).

    Returns:
        ``(m, N, 1, 1)`` bool on ``device``, or None when nothing is dropped (``k == 0``).
    """
    factor = torch.randint(0, n_factors, (1,), generator=generator)
    perm = torch.randperm(n_blocks, generator=generator)
    n_drop = int(p * n_blocks)
    if n_drop == 0:
        return None
    mask = (torch.arange(n_factors) == factor)[:, None] & (perm < n_drop)[None, :]  # (m, N) on the CPU, as PEFT
    if mask.device != device:
        if torch.accelerator.is_available():
            mask = mask.pin_memory()  # a pageable host-to-device copy would wait for the device's queue
        mask = mask.to(device, non_blocking=True)
    return mask.view(n_factors, n_blocks, 1, 1)


def apply_dropout_mask(blocks: Tensor, mask: Tensor | None) -> Tensor:
    """``(m, N, b, b)`` blocks with the masked ones replaced by the identity (``blocks`` itself for no mask)."""
    if mask is None:
        return blocks
    return torch.where(mask, torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device), blocks)


def multiplicative_dropout(blocks: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """PEFT's ``MultiplicativeDropoutLayer`` on ``(m, N, b, b)`` orthogonal blocks: :func:`dropout_mask` applied.

    Returns:
        ``(m, N, b, b)``, a new tensor; ``blocks`` is returned unchanged when nothing is dropped.
    """
    m, n_blocks = blocks.shape[:2]
    return apply_dropout_mask(blocks, dropout_mask(m, n_blocks, p, blocks.device, generator))


def _block_diagonal_within(blocks: Tensor, per_block: int) -> Tensor:
    """``(K * g, b, b)`` blocks -> ``(K, g*b, g*b)``: each run of ``g`` blocks placed on one block diagonal."""
    n_blocks, b, _ = blocks.shape
    k = n_blocks // per_block
    grouped = blocks.reshape(k, per_block, b, b).permute(0, 2, 3, 1)  # (K, b, b, g)
    dense = torch.diag_embed(grouped)  # (K, b, b, g, g), zero off the g-diagonal
    return dense.permute(0, 3, 1, 4, 2).reshape(k, per_block * b, per_block * b)


_POSITIONS: dict[tuple[int, int, str], Tensor] = {}


def _level_positions(block_size: int, level: int, device: torch.device) -> Tensor:
    """Where factor ``level``'s blocks land in one transposed ``S``-block (``S = b * 2**level``).

    Factor ``i`` is block-diagonal with period ``S`` (its permutation's period) and ``F = P D P^T`` with
    ``F[r, c] = D[perm[r], perm[c]]``, so element ``(p, q)`` of its local block ``j`` lands at row ``inv[j*b + p]``,
    column ``inv[j*b + q]`` of an ``S``-block of ``F`` (``inv`` the inverse local permutation). Returns the
    ``(2**level * b * b,)`` flat indices of those elements in ``F^T`` (``S x S``, row-major). Cached per geometry
    and device, and built outside ``torch.inference_mode`` so that a first call under inference mode (PEFT's merge
    tests, ``generate``) does not leave an index tensor autograd later refuses to save.
    """
    key = (block_size, level, str(device))
    cached = _POSITIONS.get(key)
    if cached is not None:
        return cached
    if torch.compiler.is_compiling():  # traced into the graph; storing it would be a side effect inside a checkpoint
        return _positions(block_size, level, device)
    with torch.inference_mode(False):
        positions = _positions(block_size, level, device)
    _POSITIONS[key] = positions
    return positions


def _positions(block_size: int, level: int, device: torch.device) -> Tensor:
    b, per = block_size, 2**level
    size = b * per
    j, p, q = torch.meshgrid(torch.arange(per), torch.arange(b), torch.arange(b), indexing="ij")
    inverse = torch.argsort(permute_last_dim(torch.arange(size), level, b))
    return (inverse[j * b + q] * size + inverse[j * b + p]).reshape(-1).to(device)


def composition_saved_rows(block_size: int, n_factors: int) -> int:
    """Elements per input feature (at most) that autograd keeps for the backward of :func:`cayley` + composition.

    Measured with ``saved_tensors_hooks`` (torch 2.13): ``b * (1.5 * (2**m - 2) + 2m - 1)`` plus a few small
    constants: the level products and scattered factors of :func:`compose_effective_blocks` and the Cayley
    inverses. Returned with one ``b`` of margin: ``b * (3 * (2**(m-1) - 1) + 2m)``, 232 for b = 8, m = 4.
    """
    return block_size * (3 * (2 ** (n_factors - 1) - 1) + 2 * n_factors)


def compose_effective_blocks(blocks: Tensor) -> Tensor:
    """Compose the ``m`` sparse factors into the effective blocks of ``B = B_{m-1} ... B_0``, level by level.

    Factor ``s`` is block-diagonal with period ``S = b * 2**s``, so the product ``P_s = F_s P_{s-1}`` of factors
    ``0..s`` is block-diagonal with ``S``-blocks, each the product of one ``S``-block of ``F_s`` with two
    ``S/2``-blocks ``A``, ``B`` of ``P_{s-1}``: ``P_s = [F_L A, F_R B]`` (``F_L``, ``F_R`` its column halves). On
    transposes, ``P_s^T`` is the row stack of ``A^T F_L^T`` and ``B^T F_R^T``: exactly the row-major output of one
    batched matmul of ``P_{s-1}^T`` (as ``(2K, S/2, S/2)``) by ``F_s^T`` (scattered straight into ``(2K, S/2, S)``,
    the permutation folded into the positions). One scatter and one batched matmul per level, no permuted copy:
    ``n * (S/2) * S`` multiply-adds per level instead of ``n * Be**2`` for a dense chain of the factors (4.6x fewer
    at m = 4), and autograd keeps only the level products and scattered factors (``1.5 * n * b * (2**m - 2)``
    elements, about ``2.6 * n * Be`` at m = 4).

    Args:
        blocks: ``(m, N, b, b)`` orthogonal factor blocks.

    Returns:
        ``(N / 2**(m-1), Be, Be)`` with ``Be = b * 2**(m-1)`` (a transposed view); block ``k`` of ``B`` equals
        ``E[k]``, in the dtype of ``blocks`` (autocast does not lower it). Cost independent of the tokens.
    """
    m, n_blocks, b, _ = blocks.shape
    if m == 1:
        return blocks[0]
    width = n_blocks * b
    with torch.autocast(device_type=blocks.device.type, enabled=False):
        factors = blocks.unbind(0)  # one backward node for all factors (not one zero-filled (m, N, b, b) each)
        transposed = factors[0].mT  # P_0^T: factor 0 is block-diagonal with b x b blocks, no permutation
        for level in range(1, m):
            size = b * 2**level
            k = width // size
            positions = _level_positions(b, level, blocks.device).expand(k, -1)
            zeros = torch.zeros(k, size * size, dtype=blocks.dtype, device=blocks.device)
            factor = zeros.scatter_(1, positions, factors[level].reshape(k, -1)).view(2 * k, size // 2, size)
            transposed = torch.bmm(transposed.reshape(2 * k, size // 2, size // 2), factor)
        return transposed.view(k, size, size).mT


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
    # bmm straight on the (K, tokens, Be) strided view of x (BLAS takes the row stride n): one output copy back to
    # (tokens, n), a few ops fewer than einsum's permutes in forward and backward
    out = torch.bmm(x.reshape(-1, k, be).transpose(0, 1), effective_blocks)
    return out.transpose(0, 1).reshape(*lead, k * be)


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
