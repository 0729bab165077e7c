"""BOFT on ``nn.Conv2d``: rotate the flattened filter (weight-centric), as PEFT does.

The rotation acts on the ``in_channels * kh * kw`` filter axis of the ``(out, in, kh, kw)`` weight; its
effective blocks are applied to the weight (no dense rotation), then the base layer's own convolution runs with
the rotated, scaled weight (its stride, padding and dilation are honoured). ``boft_s`` is ``(1, out)`` as in PEFT.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..ops.butterfly import rotate_weight
from .layer import BoftLayer


class BoftConv2d(nn.Module, BoftLayer):
    """BOFT adapter around an ``nn.Conv2d`` with ``groups == 1``."""

    kind = "conv2d"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__()
        BoftLayer.__init__(self, base_layer, **kwargs)
        self._init_boft_state()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config=config)

    def rotated_width(self) -> int:
        base = self.get_base_layer()
        return self.in_features * base.kernel_size[0] * base.kernel_size[1]

    def weight_to_matrix(self, weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)

    def matrix_to_weight(self, matrix: Tensor, weight_shape: torch.Size) -> Tensor:
        return matrix.reshape(weight_shape)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        previous_dtype = x.dtype
        adapters = self.adapters_to_apply()
        if not adapters:
            return self.base_layer(x, *args, **kwargs)

        base = self.get_base_layer()
        weight = self.get_base_weight()
        matrix = weight.reshape(self.out_features, -1)
        # PEFT's W @ (B_last ... B_first)^T: rotate by the first adapter first.
        for name in adapters:
            matrix = rotate_weight(
                matrix, self.application_blocks(name, torch.promote_types(weight.dtype, torch.float32))
            )
            matrix = matrix * self.scale_vector(name).to(matrix.dtype)[:, None]
        rotated = matrix.reshape(weight.shape).to(weight.dtype)
        bias = base.bias
        out = base._conv_forward(x.to(weight.dtype), rotated, bias)
        # the convolution's own dtype under autocast (as LoRA returns), else the input's (as PEFT's BOFT)
        return out if torch.is_autocast_enabled(x.device.type) else out.to(previous_dtype)

    train = BoftLayer.train

    def __repr__(self) -> str:
        return "boft." + super().__repr__()
