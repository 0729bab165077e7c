"""FSDP2 for BOFT-adapted models: block-axis placements and the right order of operations.

FSDP2's default ``Shard(0)`` would split ``boft_R`` ``(m, N, b, b)`` along its tiny factor axis (with m = 1 one
rank holds everything), and FSDP2 refuses uneven sharding on any other dim. :func:`shard_for_fsdp2` therefore
stores each ``boft_R`` block-major, ``(N, m, b, b)``, and shards that dim 0: every rank owns whole ``b x b``
blocks (block ``j`` of every factor together), ``ceil(N / W)`` of them or fewer on the last ranks, for any block
count and world size, and only their optimizer state. Exports transpose back to PEFT's layout.
It also refuses the two orderings that train silently wrong (docs/design.md, "Engines").
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import ShardingOrderError
from ..tuner.layer import BoftLayer
from ..tuner.model import is_fsdp2_sharded

__all__ = [
    "ShardingOrderError",
    "boft_layers",
    "is_fsdp2_sharded",
    "reset_adapter_parameters",
    "shard_for_fsdp2",
    "store_block_major",
]


def boft_layers(model: nn.Module) -> list[BoftLayer]:
    return [m for m in model.modules() if isinstance(m, BoftLayer)]


def _block_modules(model: nn.Module, block_classes: Iterable[str] | None) -> list[nn.Module]:
    """Transformer blocks to shard one by one (transformers' ``_no_split_modules`` by default)."""
    if block_classes is None:
        names: set[str] = set()
        for module in model.modules():
            names.update(getattr(module, "_no_split_modules", None) or [])
    else:
        names = set(block_classes)
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_for_fsdp2(
    model: nn.Module,
    mesh=None,
    *,
    reshard_after_forward: bool = True,
    mp_policy=None,
    offload_policy=None,
    block_classes: Iterable[str] | None = None,
    separate_embeddings: bool = True,
) -> nn.Module:
    """Apply ``fully_shard`` to each transformer block, to the input and output embeddings, and to the root of a
    BOFT-adapted model, in place.

    ``boft_R`` is stored block-major and sharded on its block axis (whole blocks per rank); every parameter is
    ``Shard(0)``, as FSDP2 supports uneven shards only there.
    Call it after the adapter was added (``get_peft_model`` / ``PeftModel.from_pretrained``) and before the
    optimizer is built.

    Args:
        model: the ``PeftModel`` (or a module containing our BOFT layers).
        mesh: a 1-D device mesh (default: FSDP2's, over the default process group).
        block_classes: class names of the blocks to shard separately (default: ``_no_split_modules``).
        separate_embeddings: give untied input / output embeddings their own FSDP2 units. In the root unit they
            stay gathered for the whole forward (2 x 0.25 GiB for a 0.9B Llama: measured, docs/design.md);
            as their own units each is gathered only around its use. Tied embeddings stay in the root (one
            parameter cannot be in two units).

    Returns:
        ``model`` (now an ``FSDPModule``).

    Raises:
        ShardingOrderError: the model has no BOFT adapter yet, or is already sharded.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if is_fsdp2_sharded(model):
        raise ShardingOrderError(
            "the model is already sharded with FSDP2 (fully_shard was applied before); shard_for_fsdp2 must be the "
            "only sharding step, applied once, after the BOFT adapter was added"
        )
    layers = boft_layers(model)
    if not layers:
        raise ShardingOrderError(
            "no BOFT adapter found: add it first (boft_plugin.register(); peft.get_peft_model(...)), then shard. "
            "Adapters added after fully_shard are not managed by FSDP and drift apart across ranks"
        )
    store_block_major(model)

    kwargs = dict(
        mesh=mesh,
        reshard_after_forward=reshard_after_forward,
        mp_policy=mp_policy or MixedPrecisionPolicy(),
        offload_policy=offload_policy or OffloadPolicy(),
    )
    for block in _block_modules(model, block_classes):
        fully_shard(block, **kwargs)
    if separate_embeddings:
        for module in _untied_embeddings(model):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _untied_embeddings(model: nn.Module) -> list[nn.Module]:
    from transformers import PreTrainedModel

    pretrained = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if pretrained is None:
        return []
    inputs, outputs = pretrained.get_input_embeddings(), pretrained.get_output_embeddings()
    modules = [m for m in (inputs, outputs) if m is not None and next(m.parameters(), None) is not None]
    shared = {id(p) for p in inputs.parameters()} & {id(p) for p in outputs.parameters()} if outputs else set()
    return [] if shared else [m for m in modules if not is_fsdp2_sharded(m)]


def store_block_major(model: nn.Module) -> int:
    """Hold every ``boft_R`` block-major, ``(N, m, b, b)``, so that FSDP2's ``Shard(0)`` splits the block axis.

    :func:`shard_for_fsdp2` does this itself; call it before any other FSDP2 wrapping (e.g. accelerate's FSDP2
    plugin, which shards every parameter on dim 0) and before the optimizer is built. Saves and exports keep
    PEFT's layout. Returns the number of tensors converted.
    """
    converted = 0
    for layer in boft_layers(model):
        for adapter in list(layer.boft_R):
            if not layer.boft_block_major.get(adapter):
                layer.store_block_major(adapter)
                converted += 1
    return converted


@torch.no_grad()
def reset_adapter_parameters(model: nn.Module) -> None:
    """Re-initialise every BOFT adapter as its config says (after meta-device init and ``to_empty()``).

    ``init_weights=True`` gives the identity rotation (``boft_R = 0``, ``boft_s = 1``), exactly as on one process;
    ``init_weights=False`` draws random values shard by shard. The geometry lives in plain attributes, so nothing
    else needs restoring after ``to_empty()``.
    """
    configs = getattr(model, "peft_config", None) or {}
    for layer in boft_layers(model):
        for name in layer.boft_R:
            init_weights = getattr(configs.get(name), "init_weights", True)
            layer.reset_boft_parameters(name, init_weights)
