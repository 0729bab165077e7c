"""Quantised base layers (bitsandbytes 4-bit / 8-bit, HQQ, torchao, GPTQ, ...): which ones BOFT adapts.

BOFT's forward rotates the activations and then calls the frozen base layer, so a quantised base layer needs no
change to train: its own kernel does the matmul and gives the input gradient. What a quantised layer changes is
everything that reads or writes its weight (merge, unmerge, merged export). Both go through PEFT's own
quantisation backends (``peft.utils.quantization_utils``), exactly the set stock PEFT's BOFT accepts: a backend
dequantises the weight to a float ``(out, in)`` matrix and re-quantises with the layer's own settings, and
forward-only backends (GPTQ, AWQ, EETQ, ...) train but cannot merge (docs/quantised.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import BoftQuantisedMergeError

__all__ = [
    "check_mergeable",
    "dequantise",
    "dequantised_weight",
    "describe_backend",
    "keep_bnb_training_layout",
    "quantisation_backend",
    "quantisation_kwargs",
]


def quantisation_kwargs(model: nn.Module) -> dict[str, Any]:
    """What PEFT's backends need from the model (torchao's ``get_apply_tensor_subclass``), as PEFT collects it."""
    from peft.utils.quantization_utils import get_quantization_kwargs

    return get_quantization_kwargs(model)


def quantisation_backend(module: nn.Module, **kwargs: Any):
    """PEFT's quantisation backend for ``module`` (None: not a quantised layer PEFT knows).

    Raises PEFT's ``ValueError`` where the backend needs a keyword the model does not provide (a torchao layer of
    a model without its ``hf_quantizer``).
    """
    from peft.utils.quantization_utils import resolve_quantization_backend

    return resolve_quantization_backend(module, **kwargs)


def describe_backend(backend) -> str:
    """A short name of a backend for messages and reprs (``'bnb 4bit'``, ``'gptq'``)."""
    return getattr(backend, "backend_name", "") or type(backend).__name__


def _unpack_bnb_cpu_layout(base_layer: nn.Module) -> None:
    """Undo bitsandbytes' CPU repacking of a 4-bit weight, in place, before the weight is dequantised.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode repacks its weight into a CPU-only layout
    (``quant_state.packing_format_for_cpu``) that ``dequantize_4bit`` misreads without an error; bitsandbytes'
    own ``state_dict`` undoes it the same way before saving.
    """
    weight = getattr(base_layer, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from ..runtime.upstream import unpack_bnb_cpu_weight

    data, state = unpack_bnb_cpu_weight(weight.data, state)
    weight.data = data
    weight.quant_state = state
    if getattr(base_layer, "quant_state", None) is not None:
        base_layer.quant_state = state


def keep_bnb_training_layout(model: nn.Module) -> int:
    """Switch off bitsandbytes' CPU repacking on every 4-bit layer of ``model`` and undo it where it already
    happened, in place; returns how many layers had it on.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode without gradients repacks the weight into a CPU
    inference layout and keeps it. bitsandbytes 0.50's backward then dequantises that layout as the plain one: after
    one evaluation, the input gradients of a 4-bit model are wrong (measured on a tiny Llama: 67% relative error in
    the embedding gradient; the loss itself is unchanged), so every adapter before the last quantised layer trains on
    wrong gradients without an error. The plain layout runs the same product in float32 (the repacked kernel
    computes in bf16). Layers outside the adapter's targets are switched off too: their input gradients feed the
    adapters below them.
    """
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
        _unpack_bnb_cpu_layout(module)
    return switched


def check_mergeable(layer, action: str) -> None:
    """Raise :class:`BoftQuantisedMergeError` before ``action`` when ``layer``'s backend cannot dequantise."""
    backend = layer.quantization_backend
    if backend is not None and not backend.supports_merge:
        raise BoftQuantisedMergeError(
            f"cannot {action} the BOFT adapter of layer {getattr(layer, 'boft_module_name', '?')}: its base layer is "
            f"quantised with {describe_backend(backend)}, which can run the forward but cannot dequantise its "
            "weight; nothing was changed. Keep the adapter unmerged, or load the base model unquantised to merge"
        )


@torch.no_grad()
def dequantise(base_layer: nn.Module, backend) -> Tensor:
    """A quantised layer's weight as a new float ``(out, in)`` tensor (the dtype it was loaded in)."""
    _unpack_bnb_cpu_layout(base_layer)
    return backend.get_base_weight(base_layer)


@torch.no_grad()
def dequantised_weight(layer) -> Tensor:
    """The base weight of a PEFT tuner layer as a float tensor in the base layer's own layout.

    Quantised layers are dequantised by their PEFT backend (a new tensor, in the dtype the layer was loaded in);
    plain layers return ``weight.data`` itself.
    """
    if layer.quantization_backend is not None:
        return dequantise(layer.get_base_layer(), layer.quantization_backend)
    return layer.get_base_layer().weight.data
