"""Gathered export of PEFT adapters from any layout (single process, DDP, DeepSpeed ZeRO-1/2/3, FSDP2).

Collective: every rank calls :func:`export_adapter`; adapter tensors are gathered one at a time and only global
rank 0 writes, atomically (see :mod:`boft_plugin.atomic`).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

from ..atomic import atomic_directory
from ..distributed.gather import barrier, full_tensor, rank, settle_zero3, unwrap_peft_model
from ..tuner.state_dict import unchecked_selection

__all__ = ["export_adapter"]


def _adapter_tensors(peft_model, adapter_name: str) -> dict[str, Tensor]:
    """{model state-dict key: parameter or buffer object} of what PEFT saves for ``adapter_name``."""
    from peft.utils import get_peft_model_state_dict

    live = peft_model.state_dict(keep_vars=True)
    key_of = {id(value): key for key, value in live.items()}
    with unchecked_selection():  # still partitioned here: gathered (and laid out) by the caller
        selected = get_peft_model_state_dict(peft_model, state_dict=live, adapter_name=adapter_name)
    return {key_of[id(value)]: value for value in selected.values()}


def export_adapter(
    model: nn.Module, output_dir: str | os.PathLike, adapter_names: list[str] | None = None
) -> Path | None:
    """Write the PEFT adapter(s) of ``model`` to ``output_dir`` (``adapter_config.json`` +
    ``adapter_model.safetensors``, ``peft_type: BOFT``), gathered from whatever layout ``model`` is in.

    Collective: call on every rank. Returns the directory on rank 0, None elsewhere. The files are written
    atomically into ``output_dir`` (see :mod:`boft_plugin.atomic`): an earlier export there is replaced file by
    file, never half-overwritten, and other files (checkpoints, logs, a tokenizer) are left alone.

    Args:
        model: a ``PeftModel``, possibly wrapped (DDP, DeepSpeed engine, accelerate, FSDP2 ``fully_shard``).
        adapter_names: adapters to write (default: all, laid out as PEFT's ``save_pretrained`` does).
    """
    settle_zero3(model)
    peft_model = unwrap_peft_model(model)
    names = list(peft_model.peft_config) if adapter_names is None else list(adapter_names)
    gathered: dict[str, Tensor] = {}
    for name in names:
        for key, tensor in sorted(_adapter_tensors(peft_model, name).items()):
            if key not in gathered:  # the layout of block-major (FSDP2) tensors is restored by the tuner on save
                value = full_tensor(tensor)
                gathered[key] = value.to("cpu", copy=True) if rank() == 0 else value
    target = None
    if rank() == 0:
        with atomic_directory(output_dir) as staging:
            peft_model.save_pretrained(str(staging), selected_adapters=names, state_dict=gathered)
        target = Path(output_dir)
    barrier()
    return target
