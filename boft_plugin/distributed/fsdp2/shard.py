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

from ...errors import ShardingOrderError
from ...tuner.layer import BoftLayer
from ...tuner.model import is_fsdp2_sharded

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


def device_mesh(replicas: int = 1):
    """The data-parallel mesh over every rank, on this rank's device type (:func:`..engine.rank_device`).

    ``replicas`` > 1 gives HSDP: a 2-D ``("replicate", "shard")`` mesh, each parameter sharded within a group of
    ``world / replicas`` ranks (one node: its all-gathers stay on the node's fast links) and replicated across the
    groups (the gradients are all-reduced across nodes once per step).
    """
    from torch.distributed.device_mesh import init_device_mesh

    from ...runtime.ranks import world_size
    from ..engine import rank_device

    device_type = rank_device().type
    world = world_size()
    if replicas <= 1:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    if world % replicas:
        raise ValueError(f"HSDP: {world} ranks do not split into {replicas} replica groups")
    return init_device_mesh(device_type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))


def adapter_policy(mp_policy):
    """The policy of the adapter's own units: the base's reduce dtype, but parameters kept float32 (see below)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    reduce = mp_policy.reduce_dtype if mp_policy is not None else None
    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce or torch.float32, cast_forward_inputs=False)


def shard_for_fsdp2(
    model: nn.Module,
    mesh=None,
    *,
    reshard_after_forward: bool = True,
    mp_policy=None,
    offload_policy=None,
    block_classes: Iterable[str] | None = None,
    separate_embeddings: bool = True,
    float32_adapters: bool = True,
) -> nn.Module:
    """Apply ``fully_shard`` to each transformer block, to the input and output embeddings, and to the root of a
    BOFT-adapted model, in place.

    ``boft_R`` is stored block-major and sharded on its block axis (whole blocks per rank); every parameter is
    ``Shard(0)``, as FSDP2 supports uneven shards only there.
    Call it after the adapter was added (``get_peft_model`` / ``PeftModel.from_pretrained``) and before the
    optimizer is built.

    Args:
        model: the ``PeftModel`` (or a module containing our BOFT layers).
        mesh: a 1-D device mesh, or 2-D for HSDP (default: :func:`device_mesh`, over every rank on this rank's
            device type: an accelerator's mesh is never left for FSDP2 to guess while the loaders use another).
        block_classes: class names of the blocks to shard separately (default: ``_no_split_modules``).
        separate_embeddings: give untied input / output embeddings their own FSDP2 units. In the root unit they
            stay gathered for the whole forward (2 x 0.25 GiB for a 0.9B Llama: measured, docs/design.md);
            as their own units each is gathered only around its use. Tied embeddings stay in the root (one
            parameter cannot be in two units).
        float32_adapters: when ``mp_policy`` computes in a lower precision (``param_dtype`` bf16/fp16), give every
            block's BOFT tensors a unit of their own kept in float32 (one all-gather per block), and each adapted
            layer's base weight its own unit in ``param_dtype``: the forward sees float32 ``boft_R`` / ``boft_s``
            (``bf16(1 + 3.9e-3) == 1``: a bf16 output scale would stand still for many steps while the float32
            master moves). The cost is one base unit per adapted linear instead of one per block (more, smaller
            all-gathers of the same bytes). Without a lower ``param_dtype`` nothing changes.

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

    mesh = mesh if mesh is not None else device_mesh()
    kwargs = dict(
        mesh=mesh,
        reshard_after_forward=reshard_after_forward,
        mp_policy=mp_policy or MixedPrecisionPolicy(),
        offload_policy=offload_policy or OffloadPolicy(),
    )
    lower = mp_policy is not None and mp_policy.param_dtype not in (None, torch.float32, torch.float64)
    separate_adapters = float32_adapters and lower
    adapter_kwargs = dict(kwargs, mp_policy=adapter_policy(mp_policy), reshard_after_forward=False)
    blocks = _block_modules(model, block_classes)
    # first: each is its own unit (see packed_4bit_layers), never cast (a bf16 cast of float32-stored codes would
    # corrupt them)
    packed_layers = packed_4bit_layers(model)
    for module in packed_layers:
        fully_shard(module, **dict(kwargs, mp_policy=adapter_policy(mp_policy)))
    packed = {id(m) for m in packed_layers}
    for block in blocks:
        inside = [m for m in block.modules() if isinstance(m, BoftLayer)]
        if separate_adapters and inside:
            for layer in inside:  # bottom-up: the base weight first, so the adapter unit holds the adapter alone
                if id(layer.get_base_layer()) not in packed:
                    fully_shard(layer.get_base_layer(), **kwargs)
            fully_shard(inside, **adapter_kwargs)
        fully_shard(block, **kwargs)
    if separate_adapters:
        in_blocks = {id(m) for block in blocks for m in block.modules()}
        outside = [m for m in layers if id(m) not in in_blocks]
        if outside:
            for layer in outside:
                if id(layer.get_base_layer()) not in packed:
                    fully_shard(layer.get_base_layer(), **kwargs)
            fully_shard(outside, **adapter_kwargs)
    if separate_embeddings:
        for module in _untied_embeddings(model):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def packed_4bit_layers(model: nn.Module) -> list[nn.Module]:
    """bitsandbytes 4-bit layers (``Linear4bit``): each gets an FSDP2 unit of its own.

    Their packed codes are a ``(numel / k, 1)`` parameter in ``bnb_4bit_quant_storage`` (a float dtype, so FSDP2 can
    shard it along dim 0), while the block around them holds float norms: one FSDP2 unit all-gathers one dtype.
    The quant state is a plain module attribute, not a parameter, so it stays whole on every rank (absmax: one
    float per 64 weights); ``Linear4bit.forward`` re-attaches it to the gathered codes
    (``fix_4bit_weight_quant_state_from_module``). bitsandbytes' CPU repacking of the codes in eval forwards
    (AVX512-BF16 CPUs), which would rewrite FSDP2's gathered buffer in place, was switched off when the adapter was
    added (``tuner.quantised.keep_bnb_training_layout``).
    """
    return [m for m in model.modules() if type(m._parameters.get("weight")).__name__ == "Params4bit"]


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
