"""How a layer gets the rotation blocks it applies to activations: grouped, checkpointed, cached.

- Small blocks are merged into application blocks of at least ``min_application_width(device)`` (16 on the CPU,
  64 on CUDA; ``BOFT_PLUGIN_MIN_BLOCK_WIDTH`` overrides): batched matmuls of 8-wide blocks run far below the
  machine's matmul rate (measured: docs/design.md, section 8).
- With gradients, the Cayley + composition step is recomputed in backward instead of keeping its intermediates
  when those (``n * composition_saved_rows(b, m)`` elements, 232 n for b = 8, m = 4, independent of the tokens)
  would outweigh one activation of the layer's input (``tokens * n``); for small ``b * 2**(m-1)`` or many tokens
  they are simply kept.
- Without gradients (``eval()`` + ``no_grad``), the blocks are cached while the parameter is unchanged.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..ops.butterfly import (
    application_group,
    apply_dropout_mask,
    cayley,
    compose_effective_blocks,
    composition_saved_rows,
    dropout_mask,
    effective_block_size,
    group_blocks,
)

_DEFAULT_MIN_WIDTH = {"cpu": 16, "cuda": 64}


def min_application_width(device: torch.device) -> int:
    """Narrowest block the activation matmul is given on this device type."""
    override = os.environ.get("BOFT_PLUGIN_MIN_BLOCK_WIDTH")
    if override:
        return int(override)
    return _DEFAULT_MIN_WIDTH.get(device.type, 64)


def _draw_mask(boft_r: Tensor, dropout_p: float) -> Tensor | None:
    if dropout_p <= 0:
        return None
    m, n_blocks = boft_r.shape[:2]
    return dropout_mask(m, n_blocks, dropout_p, boft_r.device)


def _effective_blocks(boft_r: Tensor, mask: Tensor | None) -> Tensor:
    with torch.autocast(device_type=boft_r.device.type, enabled=False):
        return compose_effective_blocks(apply_dropout_mask(cayley(boft_r), mask))


def effective_blocks_from(boft_r: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Effective blocks ``(K, Be, Be)`` from full ``boft_R`` ``(m, N, b, b)``; float32 whatever autocast says."""
    return _effective_blocks(boft_r, _draw_mask(boft_r, dropout_p))


def _grouped_blocks(boft_r: Tensor, mask: Tensor | None, group: int) -> Tensor:
    with torch.autocast(device_type=boft_r.device.type, enabled=False):
        return group_blocks(_effective_blocks(boft_r, mask), group)


def application_blocks(boft_r: Tensor, dropout_p: float, min_width: int, tokens: int | None = None) -> Tensor:
    """Blocks ``(K', A, A)`` to multiply the activations by: effective blocks merged to width ``A >= min_width``.

    Args:
        boft_r: ``(m, N, b, b)`` (a view is fine); dropout_p: ``boft_dropout`` probability to apply (0 in eval).
        tokens: rows of activations the blocks will multiply (None: unknown, always recompute in backward).
    """
    m, n_blocks, b, _ = boft_r.shape
    effective = effective_block_size(b, m)
    group = application_group(n_blocks // 2 ** (m - 1), effective, min_width)
    heavy = tokens is None or composition_saved_rows(b, m) > tokens
    mask = _draw_mask(boft_r, dropout_p)  # drawn once, outside the recomputed region: backward sees the same blocks
    if m > 1 and heavy and torch.is_grad_enabled() and boft_r.requires_grad:
        # keep only boft_R for backward; recompute the (token-independent, cheap) composition there. Nothing random
        # inside, so no RNG state to stash and restore per layer.
        return checkpoint(_grouped_blocks, boft_r, mask, group, use_reentrant=False, preserve_rng_state=False)
    return _grouped_blocks(boft_r, mask, group)


class BlockCache:
    """Application blocks per adapter, reused while no gradient is taken and the parameter is unchanged."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, Tensor]] = {}

    @staticmethod
    def usable(boft_r: Tensor, dropout_p: float) -> bool:
        return (
            not torch.is_grad_enabled()
            and dropout_p == 0
            and not torch.compiler.is_compiling()
            and not hasattr(boft_r, "ds_id")  # ZeRO-3 swaps .data in and out around each forward
        )

    def get(self, adapter: str, boft_r: Tensor, dtype: torch.dtype, min_width: int, build) -> Tensor:
        key = (boft_r._version, boft_r.data_ptr(), boft_r.device, dtype, min_width)
        entry = self._entries.get(adapter)
        if entry is not None and entry[0] == key:
            return entry[1]
        value = build()
        self._entries[adapter] = (key, value)
        return value

    def clear(self) -> None:
        self._entries.clear()
