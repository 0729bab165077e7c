"""A plain training loop under each engine, without a Trainer: join the process group, wrap the model, step.

Used by the distributed test worker and the sharding/memory benchmarks, which drive DDP, DeepSpeed ZeRO and FSDP2 by
hand so that every engine runs the same model, data and optimizer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ZERO_STAGES = {"zero2": 2, "zero3": 3, "zero3_init": 3}


def init_cpu_process_group(engine: str) -> tuple[int, int]:
    """Join the gloo process group the launcher set up for ``engine``; returns ``(rank, world size)``.

    ``"single"`` joins nothing (``(0, 1)``); ``"zero*"`` engines go through ``deepspeed.init_distributed`` so that
    DeepSpeed's own communication layer is initialised too.
    """
    if engine == "single":
        return 0, 1
    if engine.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def deepspeed_config(stage: int, micro_batch: int, world: int, bf16: bool = False, **zero) -> dict:
    """A minimal DeepSpeed config for hand-driven runs (ZeRO ``stage``, one micro-batch per step; fp32, or bf16
    with an fp32 master copy in the optimizer)."""
    return {
        "train_batch_size": micro_batch * world,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, **zero},
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def wrap_for_engine(engine: str, model, lr: float, micro_batch: int = 1, world: int = 1, bf16: bool = False, **zero):
    """``(runner, optimizer, deepspeed_engine_or_None)`` for ``engine`` over an adapted ``model``.

    DeepSpeed engines get :func:`deepspeed_config` (``zero`` entries added to its ``zero_optimization``). FSDP2
    shards with ``shard_for_fsdp2`` *before* the optimizer is built (it must see the sharded parameters).
    """
    engine_obj = None
    if engine == "fsdp2" or engine.startswith("fsdp2"):
        from ..distributed.fsdp2.shard import shard_for_fsdp2

        runner = shard_for_fsdp2(model)
        return runner, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr), None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if engine in ZERO_STAGES:
        import deepspeed

        config = deepspeed_config(ZERO_STAGES[engine], micro_batch, world, bf16=bf16, **zero)
        engine_obj, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine_obj, optimizer, engine_obj
    if engine == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model), optimizer, None
    return model, optimizer, None


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, engine=None) -> None:
    """Backward and step: through the DeepSpeed ``engine`` when there is one, else plain autograd + ``optimizer``."""
    if engine is not None:
        engine.backward(loss)
        engine.step()
        return
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
