"""The reference adapter of DPO, KTO and (with ``beta`` != 0) GRPO / RLOO: TRL's frozen ``ref`` copy of the trained
``default`` adapter, made exact for BOFT."""

from __future__ import annotations

REFERENCE_ADAPTER = "ref"
# the recipe tasks whose TRL trainer adds REFERENCE_ADAPTER to a PeftModel it is given (an init adapter)
TASKS_WITH_REFERENCE_ADAPTER = ("dpo", "kto")
# ... and those that add it only when their KL term is on (beta != 0)
TASKS_WITH_KL_REFERENCE_ADAPTER = ("grpo", "rloo")


def uses_reference_adapter(recipe) -> bool:
    """Whether TRL's trainer for ``recipe`` adds the ``ref`` adapter to a ``PeftModel`` it is given."""
    if recipe.task in TASKS_WITH_KL_REFERENCE_ADAPTER:
        return recipe.training.beta != 0.0
    return recipe.task in TASKS_WITH_REFERENCE_ADAPTER


def sync_reference_adapter(model, adapter: str = "default", reference: str = REFERENCE_ADAPTER) -> int:
    """Make TRL's frozen ``ref`` adapter an exact copy of ``adapter``; return the number of tensors copied.

    No-op (0) when the model has no ``ref`` adapter. Raises ``RuntimeError`` if a tensor has no counterpart.
    """
    import torch

    from ..distributed.gather import unwrap_peft_model

    peft_model = unwrap_peft_model(model)
    if reference not in peft_model.peft_config:
        return 0
    params = dict(peft_model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in params.items():
            parts = name.split(".")
            if adapter not in parts:
                continue
            ref_name = ".".join(reference if part == adapter else part for part in parts)
            if ref_name not in params:
                raise RuntimeError(f"reference adapter has no tensor {ref_name} for {name}")
            target = params[ref_name]
            source_sharded, target_sharded = hasattr(param, "full_tensor"), hasattr(target, "full_tensor")
            if target_sharded and not source_sharded:
                raise RuntimeError(f"reference tensor {ref_name} is sharded but {name} is not")
            # FSDP2: two DTensors with the same placements copy shard to shard; a sharded source is gathered
            target.copy_(param.full_tensor() if source_sharded and not target_sharded else param)
            target.requires_grad_(False)
            copied += 1
    if copied == 0:
        raise RuntimeError(f"no '{adapter}' adapter tensors found to copy into '{reference}'")
    return copied


def add_reference_adapter(model, adapter: str = "default") -> None:
    """Add the frozen ``ref`` adapter (a copy of ``adapter``) to a ``PeftModel`` now, as TRL would in DPO.

    For FSDP2 pre-sharding: adapters cannot be added after ``fully_shard``, so the reference is added before and
    TRL's own ``add_adapter("ref")`` is skipped (see :class:`boft_plugin.recipes.trainers.BoftDPOTrainer`).
    """
    model.add_adapter(REFERENCE_ADAPTER, model.peft_config[adapter])
    sync_reference_adapter(model, adapter=adapter)
