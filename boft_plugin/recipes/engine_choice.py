"""Which engine a recipe's launch means: read from TRL's (transformers') training arguments and the recipe keys.

``single`` (one process), ``ddp``, ``zero2`` / ``zero3`` (DeepSpeed, from accelerate's DeepSpeed plugin or the
``deepspeed`` key), ``fsdp2`` (``fsdp2_pre_shard``, or accelerate's FSDP plugin on GPUs). Decided once, in
``plan.prepare``; the builder and the trainer take it from the plan.
"""

from __future__ import annotations

import os

__all__ = ["ENGINES", "deepspeed_stage", "engine_of"]

ENGINES = ("single", "ddp", "zero2", "zero3", "fsdp2")


def deepspeed_stage(training) -> int | None:
    """The ZeRO stage of a DeepSpeed run (None without DeepSpeed)."""
    plugin = getattr(training, "deepspeed_plugin", None)
    if plugin is not None:
        return int(getattr(plugin, "zero_stage", 0) or 0)
    if getattr(training, "deepspeed", None):
        from transformers.integrations import is_deepspeed_zero3_enabled

        return 3 if is_deepspeed_zero3_enabled() else 2
    return None


def engine_of(training, options) -> str:
    """One of :data:`ENGINES` for this rank's arguments (every rank gets the same answer)."""
    if options.fsdp2_pre_shard or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp2"
    stage = deepspeed_stage(training)
    if stage is not None:
        return "zero3" if stage == 3 else "zero2"
    return "ddp" if getattr(training, "world_size", 1) > 1 else "single"
