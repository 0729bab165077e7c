"""Gathered, streaming export of a merged plain transformers model (the active BOFT adapters folded into the weights).

Collective: every rank calls :func:`export_merged`. Rank 0 opens its staging directory and plans the shards first,
and every rank agrees it could before anything is gathered; base weights are then gathered one tensor at a time and
only global rank 0 writes them, streamed into size-capped safetensors shards, and publishes them (:mod:`.publish`:
a directory holding only an earlier merged export is replaced whole); every rank raises if any of it failed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ..distributed.gather import full_tensor, settle_zero3, unwrap_peft_model
from ..runtime.ranks import raise_if_any_rank_failed, rank
from ..tuner.layer import BoftLayer, merge_matrix
from .publish import MODEL_WEIGHTS, publish_export
from .quantised_source import FloatWeights
from .safetensors_stream import (
    DEFAULT_MAX_SHARD_SIZE,
    ShardWriter,
    TensorEntry,
    global_shape,
    plan_shards,
    save_configs,
    tied_keys,
)

__all__ = ["export_merged"]


def _plain_tensors(
    module: nn.Module, prefix: str, buffers: bool = True
) -> Iterator[tuple[str, Tensor, BoftLayer | None]]:
    """(plain-model key, tensor, owning BOFT layer or None) in a deterministic order, adapters stripped; persistent
    buffers too unless ``buffers`` is False."""
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(module, BoftLayer):
        base = module.get_base_layer()
        for name, tensor in base.named_parameters(recurse=False):
            yield f"{prefix}{name}", tensor, module if name == "weight" else None
        for name, tensor in base.named_buffers(recurse=False) if buffers else ():
            if name not in base._non_persistent_buffers_set:
                yield f"{prefix}{name}", tensor, None
        return
    if isinstance(module, ModulesToSaveWrapper):
        # the trained copy replaces the original in a merged model
        active = module.active_adapters[0] if module.active_adapters else None
        inner = module.modules_to_save[active] if active in module.modules_to_save else module.original_module  # noqa: SIM401 (ModuleDict has no get)
        yield from _plain_tensors(inner, prefix, buffers)
        return
    for name, tensor in module.named_parameters(recurse=False):
        yield f"{prefix}{name}", tensor, None
    for name, tensor in module.named_buffers(recurse=False) if buffers else ():
        if name not in module._non_persistent_buffers_set:
            yield f"{prefix}{name}", tensor, None
    for child_name, child in module.named_children():
        yield from _plain_tensors(child, f"{prefix}{child_name}.", buffers)


def _untied_plain_tensors(
    base_model: nn.Module, buffers: bool = True
) -> Iterator[tuple[str, Tensor, BoftLayer | None]]:
    """:func:`_plain_tensors` of ``base_model`` with a tied weight (``lm_head.weight`` tied to the embeddings) once,
    as ``save_pretrained`` writes it."""
    tied = tied_keys(base_model)
    seen: dict[int, str] = {}
    for key, tensor, layer in _plain_tensors(base_model, "", buffers):
        first = seen.get(id(tensor))
        if first is not None and (key in tied or first in tied):
            continue  # the same tensor under a tied name
        seen[id(tensor)] = key
        yield key, tensor, layer


def _merged_weight(layer: BoftLayer, weight: Tensor) -> Tensor:
    """Merge the layer's active, not-yet-merged adapters into a gathered base weight (every rank gathers)."""
    matrix = layer.weight_to_matrix(weight)
    for adapter in layer.active_boft_adapters():
        boft_r = layer.to_peft_layout(adapter, full_tensor(layer.boft_R[adapter]))
        boft_s = full_tensor(layer.boft_s[adapter])
        if adapter not in layer.merged_adapters:
            matrix = merge_matrix(matrix, boft_r, boft_s)
    return layer.matrix_to_weight(matrix, weight.shape).to(weight.dtype)


def export_merged(
    model: nn.Module,
    output_dir: str | os.PathLike,
    safe_serialization: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    extra_files: Callable[[Path], None] | None = None,
    full_precision_checkpoint: str | os.PathLike | None = None,
) -> Path | None:
    """Write a plain transformers model whose weights have the active BOFT adapters merged in, streaming.

    Collective: every rank calls it (one process, DDP, ZeRO-1/2/3, FSDP2). Each base tensor is gathered by all ranks
    (one at a time), merged if it is an adapted layer's weight, and rank 0 writes it straight into its planned
    safetensors shard (:mod:`.safetensors_stream`): no rank ever holds more than one gathered tensor and its merge,
    whatever ``max_shard_size`` is. The layout is ``save_pretrained``'s: ``model.safetensors`` or
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, ``config.json``,
    ``generation_config.json``; a tied weight (``lm_head.weight`` tied to the embeddings) is written once. Everything
    appears atomically (``extra_files(staging)``, e.g. a tokenizer, included). Returns the directory on rank 0.

    A model with quantised base layers (bitsandbytes 4-bit / 8-bit, ...) is exported at full precision: each
    quantised layer's weight is read from ``full_precision_checkpoint`` (default: the directory the model was loaded
    from, when it is a safetensors checkpoint that is not itself quantised) and the adapter merged into it, else
    its dequantised weight is merged; a warning says which (:mod:`.quantised_source`). The config has no
    ``quantization_config``.
    """
    if not safe_serialization:
        raise ValueError("export_merged writes safetensors only (safe_serialization=True)")
    settle_zero3(model)
    peft_model = unwrap_peft_model(model)
    base_model = peft_model.get_base_model()
    float_weights = FloatWeights(base_model, full_precision_checkpoint)
    if float_weights.source == "dequantised" and rank() == 0:
        warnings.warn(
            "export_merged: the model's quantised layers have no full-precision checkpoint to read (pass "
            "full_precision_checkpoint=...); the merged model holds their dequantised weights, merged in float32",
            stacklevel=2,
        )
    order: list[tuple[TensorEntry, Tensor, BoftLayer | None]] = []
    for key, tensor, layer in _untied_plain_tensors(base_model):  # planned without gathering anything
        source = float_weights.get(tensor)
        shape, dtype = (source.shape, source.dtype) if source else (global_shape(tensor), tensor.dtype)
        order.append((TensorEntry(key, shape, dtype, math.prod(shape) * dtype.itemsize), tensor, layer))
    plan = plan_shards([entry for entry, _, _ in order], max_shard_size)
    parameters = sum(math.prod(entry.shape) for entry, tensor, _ in order if isinstance(tensor, nn.Parameter))

    writer_rank = rank() == 0
    with contextlib.ExitStack() as stack:
        writer, failure = None, None
        if writer_rank:  # pre-flight: staging directory on the target's filesystem, writable, before any gather
            try:
                staging = stack.enter_context(publish_export(output_dir, "merged", MODEL_WEIGHTS))
                writer = ShardWriter(staging, plan)
            except Exception as err:  # noqa: BLE001 - agreed on by every rank below, so none hangs
                failure = err
        raise_if_any_rank_failed(failure)
        with torch.no_grad():
            for entry, tensor, layer in order:
                source = float_weights.get(tensor)
                if source is None:
                    value = full_tensor(tensor, prefer_fp32_master=False)  # collective
                else:  # a quantised layer's full-precision weight, read from the checkpoint (not collective)
                    value = None
                    if failure is None:
                        try:
                            value = source.read()
                        except Exception as err:  # noqa: BLE001 - keep gathering with the others, raise after
                            failure = err
                    if value is None:  # a stand-in so that the adapter's gathers below still run on this rank
                        value = torch.zeros(entry.shape, dtype=entry.dtype)
                if layer is not None:
                    value = _merged_weight(layer, value)
                if writer is not None and failure is None:
                    try:
                        writer.write(entry, value)
                    except Exception as err:  # noqa: BLE001 - keep gathering with the others, raise after
                        failure = err
                del value
        if writer is not None:
            try:
                writer.close(require_complete=failure is None)
                if failure is not None:
                    raise failure
                _finish(staging, plan, parameters, base_model, extra_files, _written_dtype(order))
                stack.close()  # publish
            except Exception as err:  # noqa: BLE001 - nothing is published; every rank raises below
                failure = err
                stack.__exit__(type(err), err, err.__traceback__)
    raise_if_any_rank_failed(failure)
    return Path(output_dir) if writer_rank else None


def _written_dtype(order) -> torch.dtype | None:
    """The floating dtype most of the written bytes have (the config's ``dtype``)."""
    sizes: dict[torch.dtype, int] = {}
    for entry, _, _ in order:
        if entry.dtype.is_floating_point:
            sizes[entry.dtype] = sizes.get(entry.dtype, 0) + entry.nbytes
    return max(sizes, key=sizes.get) if sizes else None


def _finish(staging: Path, plan, parameters: int, base_model: nn.Module, extra_files, dtype) -> None:
    """The index (when sharded), the configs and the extra files, next to the shards."""
    if len(plan.files) > 1:
        index = {
            "metadata": {"total_parameters": parameters, "total_size": plan.total_size},
            "weight_map": {entry.key: entry.file for entry in plan.entries},
        }
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    save_configs(base_model, staging, dtype)
    if extra_files is not None:
        extra_files(staging)
