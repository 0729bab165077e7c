"""Gathered export of a merged plain transformers model (the active BOFT adapters folded into the weights).

Collective: every rank calls :func:`export_merged`; base weights are gathered one tensor at a time and only global
rank 0 writes, atomically (see :mod:`boft_plugin.atomic`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ..atomic import atomic_directory
from ..distributed.gather import barrier, full_tensor, rank, settle_zero3, unwrap_peft_model
from ..tuner.layer import BoftLayer, merge_matrix

__all__ = ["export_merged"]


def _plain_tensors(module: nn.Module, prefix: str) -> Iterator[tuple[str, Tensor, BoftLayer | None]]:
    """(plain-model key, tensor, owning BOFT layer or None) in a deterministic order, adapters stripped."""
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(module, BoftLayer):
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


def _merged_weight(layer: BoftLayer, weight: Tensor) -> Tensor:
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
    settle_zero3(model)
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
