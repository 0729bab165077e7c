"""FSDP2 Trainer checkpoints through ``torch.distributed.checkpoint`` (the ``fsdp2_pre_shard`` route).

Every rank writes its shard of the trainable state and optimizer state; loading reshards, so a checkpoint written by
W ranks resumes on W'. The frozen base model is not written (it comes from the base checkpoint). Used by
``trainers.BoftTrainerMixin`` in place of the Trainer's own model/optimizer (de)serialisation.
"""

from __future__ import annotations

import os

from ...runtime.ranks import rank

DCP_DIR = "fsdp2_dcp"


def _model_and_optimizer(trainer):
    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    return model, trainer.optimizer


def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # the frozen base comes from the base model, not from here
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_sharded_state(trainer, output_dir: str) -> None:
    """Collective: write this rank's adapter and optimizer shards, and (rank 0) the scheduler."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = _model_and_optimizer(trainer)
    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=os.path.join(output_dir, DCP_DIR))
    if rank() == 0 and trainer.lr_scheduler is not None:
        torch.save(trainer.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))


def load_sharded_state(trainer, checkpoint: str) -> None:
    """Collective: load adapter and optimizer shards (resharded to this world size) and the scheduler."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optimizer = _model_and_optimizer(trainer)
    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=os.path.join(checkpoint, DCP_DIR))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_options(strict=False),
    )
    scheduler_file = os.path.join(checkpoint, "scheduler.pt")
    if trainer.lr_scheduler is not None and os.path.isfile(scheduler_file):
        trainer.lr_scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))
