"""Where a merged export of a quantised model takes the full-precision weights of its quantised layers.

A merged export is a plain full-precision model. For each quantised layer (bitsandbytes 4-bit / 8-bit, ...) its
weight comes from the **full-precision checkpoint the model was loaded from** when that is a local safetensors
checkpoint without a ``quantization_config`` (train in 4-bit, ship in bf16: the adapter is merged into the original
weights, not into their 4-bit rounding), otherwise from the layer's own dequantisation (PEFT's backend), written in
the dtype of the model's unquantised weights. :class:`FloatWeights` says which one it used
(docs/quantised.md, "Merged export").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..distributed.checkpoint_files import CheckpointIndex
from ..tuner.layer import BoftLayer
from ..tuner.quantised import dequantise, dequantised_weight, quantisation_backend

__all__ = ["FloatWeight", "FloatWeights", "quantised_modules"]


@dataclass(frozen=True)
class FloatWeight:
    """The full-precision weight of one quantised layer: planned from ``shape`` / ``dtype``, read when written."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], Tensor]


def quantised_modules(base_model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """``(name, module, base layer)`` for every quantised layer: BOFT-adapted ones and plain ones alike."""
    skip: list[str] = []
    for name, module in base_model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, BoftLayer):
            skip.append(name + ".")
            if module.quantization_backend is not None:
                yield name, module, module.get_base_layer()
        elif quantisation_backend(module) is not None:
            yield name, module, module


def _unquantised_dtype(base_model: nn.Module) -> torch.dtype:
    embeddings = base_model.get_input_embeddings() if hasattr(base_model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if weight is not None and weight.is_floating_point() else torch.float32


def _full_precision_checkpoint(path: str | os.PathLike | None) -> CheckpointIndex | None:
    if not path or not Path(path).is_dir():
        return None
    config = Path(path) / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text()):
        return None  # a pre-quantised checkpoint: its weights are the quantised ones
    try:
        return CheckpointIndex(path)
    except (FileNotFoundError, OSError, ValueError):
        return None


class FloatWeights:
    """Full-precision weights of a model's quantised layers, keyed by the id of the (packed) weight parameter.

    Args:
        base_model: the transformers model under the PEFT wrapper.
        checkpoint: the full-precision checkpoint to read; default: the directory the model was loaded from.
    """

    def __init__(self, base_model: nn.Module, checkpoint: str | os.PathLike | None = None):
        self.by_weight: dict[int, FloatWeight] = {}
        modules = list(quantised_modules(base_model))
        self.source = "none"
        if not modules:
            return
        if checkpoint is None:
            checkpoint = getattr(base_model, "name_or_path", None)
        index = _full_precision_checkpoint(checkpoint)
        prefix = getattr(base_model, "base_model_prefix", None)
        keys = {name: index.resolve([f"{name}.weight"], prefix) if index else None for name, _, _ in modules}
        if index is not None and all(keys.values()):
            self.source = f"checkpoint {checkpoint}"
            for name, _, base in modules:
                self.by_weight[id(base.weight)] = _from_checkpoint(index, keys[name])
        else:
            self.source = "dequantised"
            dtype = _unquantised_dtype(base_model)
            for _, module, base in modules:
                shape = (base.out_features, base.in_features)
                self.by_weight[id(base.weight)] = FloatWeight(shape, dtype, _dequantiser(module, base, dtype))

    def get(self, tensor: Tensor) -> FloatWeight | None:
        return self.by_weight.get(id(tensor))


def _from_checkpoint(index: CheckpointIndex, key: str) -> FloatWeight:
    from safetensors import safe_open

    file = index.key_to_file[key]
    with safe_open(file, framework="pt", device="cpu") as handle:
        piece = handle.get_slice(key)
        shape = tuple(piece.get_shape())
        dtype = _SAFETENSORS_DTYPES[piece.get_dtype()]

    def read() -> Tensor:
        with safe_open(file, framework="pt", device="cpu") as handle:
            return handle.get_tensor(key)

    return FloatWeight(shape, dtype, read)


def _dequantiser(module: nn.Module, base: nn.Module, dtype: torch.dtype) -> Callable[[], Tensor]:
    def read() -> Tensor:
        if isinstance(module, BoftLayer):
            return dequantised_weight(module).to(dtype)
        return dequantise(base, quantisation_backend(base)).to(dtype)

    return read


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
