"""Gathered export of PEFT adapters from any layout (single process, DDP, DeepSpeed ZeRO-1/2/3, FSDP2).

Collective: every rank calls :func:`export_adapter`; adapter tensors are gathered one at a time and only global
rank 0 writes, atomically (see :mod:`boft_plugin.atomic`).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

from ..atomic import atomic_directory
from ..distributed.gather import full_tensor, raise_on_every_rank, rank, settle_zero3, unwrap_peft_model
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
    model: nn.Module,
    output_dir: str | os.PathLike,
    adapter_names: list[str] | None = None,
    single_factor: bool = False,
) -> Path | None:
    """Write the PEFT adapter(s) of ``model`` to ``output_dir`` (``adapter_config.json`` +
    ``adapter_model.safetensors``, ``peft_type: BOFT``), gathered from whatever layout ``model`` is in.

    Collective: call on every rank. Returns the directory on rank 0, None elsewhere. The files are written
    atomically into ``output_dir`` (see :mod:`boft_plugin.atomic`): an earlier export there is replaced file by
    file, never half-overwritten, and other files (checkpoints, logs, a tokenizer) are left alone.

    Args:
        model: a ``PeftModel``, possibly wrapped (DDP, DeepSpeed engine, accelerate, FSDP2 ``fully_shard``).
        adapter_names: adapters to write (default: all, laid out as PEFT's ``save_pretrained`` does).
        single_factor: write each adapter in its exactly equivalent single-factor form (``boft_n_butterfly_factor:
            1``, ``boft_block_size: b * 2**(m-1)``), which stock PEFT loads without its CUDA extension
            (:mod:`boft_plugin.export.single_factor`). Raises ``SingleFactorError`` naming the layer, and writes
            nothing, when a block has no accurate single-factor form.
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
    target, error = None, None
    if rank() == 0:
        try:
            with atomic_directory(output_dir) as staging:
                if single_factor:
                    _save_single_factor(peft_model, staging, names, gathered)
                else:
                    peft_model.save_pretrained(str(staging), selected_adapters=names, state_dict=gathered)
            target = Path(output_dir)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank after the barrier, so none hangs
            error = err
    raise_on_every_rank(error)
    return target


def _save_single_factor(peft_model, staging: Path, names: list[str], gathered: dict[str, Tensor]) -> None:
    """PEFT's own save into a scratch directory, then each adapter rewritten in single-factor form into ``staging``."""
    import tempfile

    from .single_factor import write_single_factor

    with tempfile.TemporaryDirectory(dir=staging.parent, prefix=".single-factor-") as scratch:
        peft_model.save_pretrained(scratch, selected_adapters=names, state_dict=gathered)
        for config in sorted(Path(scratch).rglob("adapter_config.json")):
            relative = config.parent.relative_to(scratch)
            (staging / relative).mkdir(parents=True, exist_ok=True)
            write_single_factor(config.parent, staging / relative)
