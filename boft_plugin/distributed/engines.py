"""A plain training loop under each engine, without a Trainer: join the process group, take one step.

Used by the distributed test worker and the sharding benchmark, which drive DDP, DeepSpeed ZeRO and FSDP2 by hand
so that every engine runs the same model, data and optimizer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, engine=None) -> None:
    """Backward and step: through the DeepSpeed ``engine`` when there is one, else plain autograd + ``optimizer``."""
    if engine is not None:
        engine.backward(loss)
        engine.step()
        return
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
