"""Level (a): one adapted ``nn.Linear`` (no bias, as in Llama), forward + backward without an optimizer.

The input requires grad (the layer sits inside a network), the output gets a fixed random gradient. Saved
activations exclude the layer input (it is held by the surrounding graph whatever the adapter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .common import log
from .harness import RunOptions, Workload, run_case
from .methods import Method, StockEstimator, apply_method, boft_fits, layer_methods, stock_extra_flops
from .report import add_ratios


class _OneLayer(nn.Module):
    """Smallest model PEFT can wrap: a single linear layer named ``layer``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.layer = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@dataclass(frozen=True)
class LayerCase:
    in_features: int
    out_features: int
    tokens: int
    block_size: int

    @property
    def title(self) -> str:
        return f"Layer {self.in_features}→{self.out_features}, tokens {self.tokens}, b={self.block_size}"

    def fields(self) -> dict:
        return {
            "level": "layer",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "tokens": self.tokens,
            "block_size": self.block_size,
        }


def _builder(case: LayerCase, opts: RunOptions):
    device = opts.device

    def build(method: Method) -> Workload:
        model = _OneLayer(case.in_features, case.out_features).to(device.torch_device, device.dtype)
        trainable = apply_method(method, model, case.block_size, ["layer"])
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(case.tokens, case.in_features, generator=gen).to(device.torch_device, device.dtype)
        x.requires_grad_(True)
        grad_out = torch.randn(case.tokens, case.out_features, generator=gen).to(device.torch_device, device.dtype)
        params = [p for p in trainable.parameters() if p.requires_grad]

        def reset() -> None:
            x.grad = None
            for p in params:
                p.grad = None

        return Workload(
            model=trainable,
            forward=lambda: model(x),  # `model` was adapted in place by get_peft_model
            finish=lambda y: y.backward(grad_out),
            reset=reset,
            exclude=[*trainable.parameters(), *trainable.buffers(), x],
        )

    return build


def run_layer_case(case: LayerCase, factors: list[int], opts: RunOptions, estimator: StockEstimator) -> dict:
    """All methods on one case; returns ``{"case": ..., "rows": [...], "lora_by_m": {...}}``."""
    valid = [m for m in factors if boft_fits(case.in_features, case.block_size, m)]
    methods, lora_by_m = layer_methods(case.in_features, case.out_features, case.block_size, valid)
    log(f"  {case.title}")
    rows = run_case(
        methods,
        _builder(case, opts),
        opts,
        case.fields(),
        estimator,
        extra_flops=lambda method: stock_extra_flops(case.in_features, case.tokens, method.m),
    )
    for m in sorted(set(factors) - set(valid)):
        for kind in ("ours", "stock"):
            method = Method(kind, m=m)
            note = f"skipped (width {case.in_features} not divisible by b·2^(m-1) = {case.block_size * 2 ** (m - 1)})"
            rows.append(
                {**case.fields(), "method": method.key, "label": method.label, "kind": kind, "m": m}
                | {"status": "skipped", "note": note}
            )
    add_ratios(rows, lora_by_m, opts.metric)
    return {"case": case.fields(), "title": case.title, "rows": rows, "lora_by_m": lora_by_m}
