"""What each rank stores of the BOFT adapter: local shares, block alignment, bytes (params + optimizer state).

Call :func:`adapter_shards` on every rank (it is local, not collective) and print :func:`format_shards`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..runtime.ranks import rank
from ..tuner.layer import BoftLayer

__all__ = ["ShardInfo", "adapter_shards", "format_shards", "optimizer_state_bytes"]


@dataclass
class ShardInfo:
    """One ``boft_R`` tensor as seen by one rank.

    ``layout`` is ``full`` (replicated: single process, DDP, ZeRO-1/2), ``fsdp2`` (DTensor shard) or ``zero3``
    (flat ZeRO-3 partition). ``whole_blocks`` says whether the share starts and ends on ``b x b`` block
    boundaries; ``whole_effective_blocks`` whether it holds whole effective blocks of size ``b * 2**(m-1)``.
    """

    rank: int
    name: str
    layout: str
    global_shape: tuple[int, ...]
    local_elements: int
    local_blocks: float
    whole_blocks: bool
    whole_effective_blocks: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _aligned(start: int, stop: int, total: int, unit: int) -> bool:
    return start % unit == 0 and (stop % unit == 0 or stop >= total)


def _describe(name: str, param: nn.Parameter, geometry, block_major: bool) -> ShardInfo:
    from torch.distributed.tensor import DTensor

    m, n_blocks, b, _ = geometry.param_shape
    block, per_effective = b * b, 2 ** (m - 1)
    total = m * n_blocks * block
    if isinstance(param, DTensor):
        local = param.to_local()
        mesh = param.device_mesh
        if block_major:  # (N, m, b, b) sharded on dim 0: rows of whole blocks, ceil(N / W) per rank
            shard_dim = mesh.ndim - 1  # HSDP: (replicate, shard); the blocks are split along the last dim
            chunk = -(-n_blocks // mesh.size(shard_dim))
            start = min(mesh.get_local_rank(shard_dim) * chunk, n_blocks)
            stop = start + local.shape[0]
            whole_effective = _aligned(start, stop, n_blocks, per_effective)
        else:
            whole_effective = m == 1 and param.placements[0].is_shard(0)
        return ShardInfo(
            rank(), name, "fsdp2", geometry.param_shape, local.numel(), local.numel() / block, True, whole_effective
        )
    if hasattr(param, "ds_id"):
        part = param.ds_tensor.numel()  # padded partition size, the same on every rank
        start = min(rank() * part, total)
        stop = min(start + part, total)
        elements = stop - start
        return ShardInfo(
            rank(),
            name,
            "zero3",
            tuple(param.ds_shape),
            elements,
            elements / block,
            _aligned(start, stop, total, block),
            _aligned(start, stop, total, block * per_effective),
        )
    return ShardInfo(rank(), name, "full", geometry.param_shape, param.numel(), param.numel() / block, True, True)


def adapter_shards(model: nn.Module) -> list[ShardInfo]:
    """This rank's share of every ``boft_R`` in ``model`` (any wrapper; local, not collective)."""
    rows = []
    for module_name, module in model.named_modules():
        if isinstance(module, BoftLayer):
            for adapter, param in module.boft_R.items():
                geometry = module.boft_geometry[adapter]
                block_major = bool(module.boft_block_major.get(adapter))
                rows.append(_describe(f"{module_name}.boft_R.{adapter}", param, geometry, block_major))
    return rows


def format_shards(rows: list[ShardInfo]) -> str:
    """A markdown table of :func:`adapter_shards` rows (one rank's, or all ranks' concatenated)."""
    lines = [
        "| rank | parameter | layout | global shape | local elements | local blocks | whole blocks | whole eff. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.rank} | {r.name} | {r.layout} | {tuple(r.global_shape)} | {r.local_elements} | "
            f"{r.local_blocks:g} | {r.whole_blocks} | {r.whole_effective_blocks} |"
        )
    return "\n".join(lines)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this rank holds (local shards only; DeepSpeed wrappers unwrapped)."""
    from torch.distributed.tensor import DTensor

    inner = optimizer
    while hasattr(inner, "optimizer") and isinstance(inner.optimizer, torch.optim.Optimizer):
        inner = inner.optimizer
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if isinstance(value, DTensor) else value
                total += local.numel() * local.element_size()
    return total
