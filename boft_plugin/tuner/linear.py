"""BOFT on ``nn.Linear`` and transformers' ``Conv1D`` (``fan_in_fan_out``): rotate the activations.

Training is input-centric: ``x`` is rotated by the composed effective blocks (one batched block matmul), then
the frozen base layer runs as usual, so the base weight needs no gradient and no dense ``in x in`` rotation is
ever built. Output: ``y = (base(x @ B) - bias) * boft_s + bias``, exactly PEFT's maths.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..ops.butterfly import rotate_activations
from ..ops.scale_shift import scale_shift
from .layer import BoftLayer


class BoftLinear(nn.Module, BoftLayer):
    """BOFT adapter around a linear layer (``nn.Linear``, or ``Conv1D`` with ``fan_in_fan_out=True``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__()
        BoftLayer.__init__(self, base_layer, **kwargs)
        self._init_boft_state()
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config=config)

    def rotated_width(self) -> int:
        return self.in_features

    def weight_to_matrix(self, weight: Tensor) -> Tensor:
        return weight.T if self.fan_in_fan_out else weight  # Conv1D stores (in, out)

    def matrix_to_weight(self, matrix: Tensor, weight_shape: torch.Size) -> Tensor:
        return matrix.T if self.fan_in_fan_out else matrix

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapters = self.adapters_to_apply()
        if not adapters:
            return self.base_layer(x, *args, **kwargs)

        # Blocks are built (and boft_dropout drawn) in PEFT's adapter order, so the random stream matches PEFT's.
        # PEFT composes B = B_last ... B_first, so x @ B applies the last active adapter's rotation first.
        tokens = x.numel() // x.shape[-1]
        blocks = [self.application_blocks(name, x.dtype, tokens) for name in adapters]
        rotated = x
        for block in reversed(blocks):
            rotated = rotate_activations(rotated, block)
        result = self.base_layer(rotated, *args, **kwargs)

        scale = self.scale_vector(adapters[0])
        for name in adapters[1:]:
            scale = scale * self.scale_vector(name)
        # (result - bias) * s + bias. s and the bias are not cast: under autocast (bf16 result, fp32 s) the maths
        # runs in float32 like PEFT's type promotion, rounded once to the base layer's output dtype (as LoRA).
        bias = self.get_base_layer().bias
        return scale_shift(result, scale, bias, out_dtype=result.dtype, save_output=self.scale_is_large(adapters))

    train = BoftLayer.train

    def __repr__(self) -> str:
        return "boft." + super().__repr__()
