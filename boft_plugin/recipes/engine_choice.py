"""Which engine a recipe's launch means, read from TRL's (transformers') training arguments and the recipe keys.

``single`` (one process), ``ddp``, ``zero2`` / ``zero3`` (DeepSpeed ZeRO-1/2 and 3, from accelerate's DeepSpeed
plugin or the ``deepspeed`` key), ``fsdp2`` (``fsdp2_pre_shard``, or accelerate's FSDP plugin on GPUs). Decided once,
in ``plan.prepare``; :func:`engine_for` makes the engine object (``boft_plugin.distributed``) the builder and the
trainer use.
"""

from __future__ import annotations

import os

__all__ = ["ENGINES", "deepspeed_stage", "engine_for", "engine_of"]

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


def launched_local_world_size() -> int:
    """Ranks on this node (``LOCAL_WORLD_SIZE``, set by torch.distributed.run and accelerate; 1 when unset)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def engine_for(name: str, training, options):
    """The engine object for :func:`engine_of`'s ``name``."""
    import torch

    from ..distributed.replicated import ReplicatedEngine
    from ..runtime.ranks import log

    def every_rank(message: str) -> None:
        log(message, every_rank=True)

    if name == "fsdp2" and options.fsdp2_pre_shard:
        from ..distributed.fsdp2 import FSDP2Engine

        dtype = torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else None
        replicas = max(1, training.world_size // launched_local_world_size()) if options.fsdp2_hsdp else 1
        return FSDP2Engine(mp_dtype=dtype, replicas=replicas, log=every_rank)
    if name in ("zero2", "zero3"):
        from ..distributed.zero import ZeroEngine

        return ZeroEngine(deepspeed_stage(training), log=every_rank)
    return ReplicatedEngine("fsdp2" if name == "fsdp2" else name)  # fsdp2 here: accelerate's plugin wraps
