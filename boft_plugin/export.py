"""Gathered export from any layout: a PEFT adapter, or a merged plain transformers model.

Both functions are collective: every rank calls them (under DDP, DeepSpeed ZeRO-1/2/3 or FSDP2), tensors are
gathered one module at a time, and only global rank 0 writes, atomically (see :mod:`boft_plugin.atomic`).
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from .atomic import atomic_directory
from .distributed.gather import barrier, full_tensor, rank, unwrap_peft_model
from .tuner.layer import BoftLayerMixin, merge_matrix

__all__ = ["export_adapter", "export_merged"]

# Set while the exporter asks PEFT which tensors belong to an adapter (they may still be partitioned then).
selecting_for_export: contextvars.ContextVar[bool] = contextvars.ContextVar("selecting_for_export", default=False)


def _settle_zero3(model: nn.Module) -> None:
    """Wait for ZeRO-3 parameters a DeepSpeed engine still has in flight (prefetched) before gathering."""
    if hasattr(model, "empty_partition_cache"):
        model.empty_partition_cache()


def _adapter_tensors(peft_model, adapter_name: str) -> dict[str, Tensor]:
    """{model state-dict key: parameter or buffer object} of what PEFT saves for ``adapter_name``."""
    from peft.utils import get_peft_model_state_dict

    live = peft_model.state_dict(keep_vars=True)
    key_of = {id(value): key for key, value in live.items()}
    token = selecting_for_export.set(True)
    try:
        selected = get_peft_model_state_dict(peft_model, state_dict=live, adapter_name=adapter_name)
    finally:
        selecting_for_export.reset(token)
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
    _settle_zero3(model)
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


def _plain_tensors(module: nn.Module, prefix: str) -> Iterator[tuple[str, Tensor, BoftLayerMixin | None]]:
    """(plain-model key, tensor, owning BOFT layer or None) in a deterministic order, adapters stripped."""
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(module, BoftLayerMixin):
        base = module.get_base_layer()
        for name, tensor in base.named_parameters(recurse=False):
            yield f"{prefix}{name}", tensor, module if name == "weight" else None
        for name, tensor in base.named_buffers(recurse=False):
            if name not in base._non_persistent_buffers_set:
                yield f"{prefix}{name}", tensor, None
        return
    if isinstance(module, ModulesToSaveWrapper):
        # the trained copy replaces the original in a merged model
        active = module.active_adapters[0] if module.active_adapters else None
        inner = module.modules_to_save[active] if active in module.modules_to_save else module.original_module  # noqa: SIM401 (ModuleDict has no get)
        yield from _plain_tensors(inner, prefix)
        return
    for name, tensor in module.named_parameters(recurse=False):
        yield f"{prefix}{name}", tensor, None
    for name, tensor in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            yield f"{prefix}{name}", tensor, None
    for child_name, child in module.named_children():
        yield from _plain_tensors(child, f"{prefix}{child_name}.")


def _merged_weight(layer: BoftLayerMixin, weight: Tensor) -> Tensor:
    """Merge the layer's active, not-yet-merged adapters into a gathered base weight (every rank gathers)."""
    matrix = layer.weight_to_matrix(weight)
    for adapter in layer.active_boft_adapters():
        boft_r = layer.to_peft_layout(adapter, full_tensor(layer.boft_R[adapter]))
        boft_s = full_tensor(layer.boft_s[adapter])
        if adapter not in layer.merged_adapters:
            matrix = merge_matrix(matrix, boft_r, boft_s)
    return layer.matrix_to_weight(matrix, weight.shape).to(weight.dtype)


def export_merged(model: nn.Module, output_dir: str | os.PathLike, safe_serialization: bool = True) -> Path | None:
    """Write a plain transformers model whose weights have the active BOFT adapters merged in.

    Collective: every rank calls it. Base weights are gathered one tensor at a time and only rank 0 keeps a
    (CPU) copy, so no rank holds the whole model twice. Returns the directory on rank 0, None elsewhere.
    """
    _settle_zero3(model)
    peft_model = unwrap_peft_model(model)
    base_model = peft_model.get_base_model()
    state: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, tensor, layer in _plain_tensors(base_model, ""):
            value = full_tensor(tensor, prefer_fp32_master=False)
            if layer is not None:
                value = _merged_weight(layer, value)
            if rank() == 0:
                state[key] = value.to("cpu", copy=True)
    target = None
    if rank() == 0:
        with atomic_directory(output_dir) as staging:
            base_model.save_pretrained(str(staging), state_dict=state, safe_serialization=safe_serialization)
        target = Path(output_dir)
    barrier()
    return target
