"""bf16 / fp16 parity with stock PEFT's BOFT run in the same precision (tests and the table in docs/numerics.md).

One adapted ``nn.Linear(256, 96, bias=True)`` (b = 8, m in {1, 2, 4}, random ``boft_R``, every ``boft_s`` set to
s in {1, 0.05, 0}); per quantity (output, grad x, grad boft_R, grad boft_s) the error against the truth is
``max |impl - truth| / max |truth|``, where the truth is the same parameter values and inputs evaluated in float64
by PEFT's own maths (docs/design.md, "Oracle"). "Low precision" has three meanings, all covered:

* ``cast``: ``peft_model.to(dtype)``: adapter, base weights and inputs in ``dtype``;
* ``cast_base``: base model in ``dtype`` before ``get_peft_model`` (PEFT's ``autocast_adapter_dtype`` then keeps
  ``boft_R`` / ``boft_s`` in float32: what a user of a bf16 checkpoint gets);
* ``autocast``: float32 model and inputs under ``torch.autocast("cpu", dtype)``.

Criterion "no worse than stock": ``err(ours) <= FACTOR * err(stock) + FLOOR[dtype]``.
"""

from __future__ import annotations

import copy

import torch
from peft import BOFTConfig, get_peft_model

from ..ops.compare import max_relative_error
from ..stock_peft import stock_peft_boft
from ..tuner.registry import register, unregister

WIDTH, OUT, BLOCK, TOKENS = 256, 96, 8, (4, 32)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("cast", "cast_base", "autocast")
S_VALUES = (1.0, 0.05, 0.0)
FACTORS = (1, 2, 4)
BIAS_SCALES = (None, 4.0)  # nn.Linear's init bias, or large biases (Qwen-style q/k/v) where 1/s losses show
QUANTITIES = ("output", "grad x", "grad boft_R", "grad boft_s")
FACTOR = 1.5
FLOOR = {torch.bfloat16: 2.0**-11, torch.float16: 2.0**-14}  # 1/8 of the unit roundoff
CASES = [(mode, d, m, s, bs) for bs in BIAS_SCALES for mode in MODES for d in DTYPES for m in FACTORS for s in S_VALUES]
TEST_CASES = [case for case in CASES if case[-1] is not None]  # the large-bias half: where 1/s losses show


def _base(bias_scale: float | None) -> torch.nn.Module:
    torch.manual_seed(1234)
    layer = torch.nn.Linear(WIDTH, OUT, bias=True)
    if bias_scale is not None:
        with torch.no_grad():
            layer.bias.normal_(0.0, bias_scale)
    return torch.nn.Sequential(layer)


def _layer(model):
    return model.base_model.model[0]


def build_models(mode: str, dtype: torch.dtype, factors: int, s: float, bias_scale=None):
    """(stock, ours) with identical parameter values in the precision layout of ``mode``."""
    base = _base(bias_scale)
    if mode == "cast_base":
        base = base.to(dtype)
    config = dict(target_modules=["0"], boft_block_size=BLOCK, boft_n_butterfly_factor=factors, init_weights=False)
    with stock_peft_boft(multi_factor=True):
        stock = get_peft_model(copy.deepcopy(base), BOFTConfig(**config))
    register()
    try:
        ours = get_peft_model(copy.deepcopy(base), BOFTConfig(**config))
    finally:
        unregister()
    ours.load_state_dict(stock.state_dict())
    for model in (stock, ours):
        with torch.no_grad():
            _layer(model).boft_s["default"].fill_(s)
        if mode == "cast":
            model.to(dtype)
    return stock, ours


def _inputs(mode: str, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(*TOKENS, WIDTH, generator=generator)
    grad = torch.randn(*TOKENS, OUT, generator=generator)
    if mode in ("cast", "cast_base"):
        x, grad = x.to(dtype), grad.to(dtype)
    return x, grad


def forward_backward(model, x, grad, autocast_dtype=None) -> dict:
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y = model(x)
    y.backward(grad.to(y.dtype))
    layer = _layer(model)
    return {
        "output": y.detach(),
        "grad x": x.grad,
        "grad boft_R": layer.boft_R["default"].grad,
        "grad boft_s": layer.boft_s["default"].grad,
    }


def _error(actual, expected) -> float:
    return max_relative_error(actual, expected) if torch.isfinite(actual).all() else float("nan")


def run_case(mode: str, dtype_name: str, factors: int, s: float, bias_scale=None) -> dict:
    """Errors of stock PEFT and of ours against the float64 truth, per quantity."""
    dtype = DTYPES[dtype_name]
    stock, ours = build_models(mode, dtype, factors, s, bias_scale)
    x, grad = _inputs(mode, dtype)
    autocast_dtype = dtype if mode == "autocast" else None
    with stock_peft_boft(multi_factor=True):
        truth = forward_backward(copy.deepcopy(stock).double(), x.double(), grad.double())
        got_stock = forward_backward(stock, x, grad, autocast_dtype)
    got_ours = forward_backward(ours, x, grad, autocast_dtype)
    if autocast_dtype is not None:
        # under autocast ours returns the base layer's dtype, as LoRA does; stock PEFT's BOFT returns float32, so
        # its output is rounded to that dtype too before the comparison (the rounding any next bf16 op applies)
        got_stock["output"] = got_stock["output"].to(got_ours["output"].dtype)
    row = {"mode": mode, "dtype": dtype_name, "m": factors, "s": s, "bias_scale": bias_scale}
    for impl, got in (("stock", got_stock), ("ours", got_ours)):
        for quantity in QUANTITIES:
            row[f"{impl}|{quantity}"] = _error(got[quantity], truth[quantity])
    return row


def worse_than_stock(row: dict) -> list[str]:
    """Quantities where ours is worse than ``FACTOR * stock + FLOOR`` (or not finite)."""
    floor = FLOOR[DTYPES[row["dtype"]]]
    bad = []
    for quantity in QUANTITIES:
        ours, stock = row[f"ours|{quantity}"], row[f"stock|{quantity}"]
        if not ours <= FACTOR * stock + floor:  # NaN fails too
            bad.append(f"{quantity}: ours {ours:.3g} vs stock {stock:.3g}")
    return bad
