"""The compared methods: how to build each one with PEFT, parameter matching, and the stock-PEFT cost estimate.

* ``base``: the frozen base, no adapter (weights frozen, the input still requires grad).
* ``ours``: boft-plugin, reached through ``boft_plugin.register()`` + ``peft.get_peft_model`` (public API only).
* ``stock`` m=1: stock PEFT BOFT as it runs on a machine without its CUDA extension (one factor whatever m).
* ``stock`` m>1: stock PEFT's own dense m-factor maths, via the ``stock_peft_boft(multi_factor=True)`` oracle.
* ``lora``: LoRA with r chosen so that its parameter count matches BOFT's (same layer, b and m).
* ``oft``: PEFT OFT with ``oft_block_size`` equal to the BOFT block size (PEFT defaults otherwise).
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import peft
from torch import nn

import boft_plugin
from boft_plugin.stock_peft import stock_peft_boft
from boft_plugin.tuner.geometry import GeometryError, resolve_geometry


@dataclass(frozen=True)
class Method:
    kind: str  # "base" | "ours" | "stock" | "lora" | "oft"
    m: int = 1  # butterfly factors (BOFT kinds; the LoRA rank was matched to BOFT with this m)
    r: int = 0  # LoRA rank
    matched_params: int = 0  # LoRA only: the BOFT parameter count r was matched to
    compiled: bool = False  # every decoder layer compiled (torch.compile, fullgraph, inductor); model cases only

    @property
    def label(self) -> str:
        return self._eager_label + (", compiled" if self.compiled else "")

    @property
    def _eager_label(self) -> str:
        if self.kind == "base":
            return "frozen base"
        if self.kind == "ours":
            return f"ours BOFT m={self.m}"
        if self.kind == "stock":
            return "stock PEFT BOFT m=1 (as on CPU)" if self.m == 1 else f"stock PEFT BOFT m={self.m} (oracle)"
        if self.kind == "lora":
            return f"LoRA r={self.r} (≈BOFT m={self.m})"
        return "PEFT OFT"

    @property
    def key(self) -> str:
        """Short stable id used in the JSON output."""
        key = {"base": "base", "oft": "oft"}.get(self.kind, f"{self.kind}_m{self.m}" + (f"_r{self.r}" * bool(self.r)))
        return key + ("_compiled" * self.compiled)

    @contextmanager
    def context(self) -> Iterator[None]:
        """Build *and* run the method inside this context (stock PEFT looks its extension up in every forward)."""
        if self.kind == "ours":
            was_registered = boft_plugin.is_registered()
            boft_plugin.register()
            try:
                yield
            finally:
                if not was_registered:
                    boft_plugin.unregister()
        elif self.kind == "stock":
            with stock_peft_boft(multi_factor=self.m > 1):
                yield
        else:
            with nullcontext():
                yield

    def peft_config(self, block_size: int, target_modules: list[str]) -> peft.PeftConfig | None:
        if self.kind == "base":
            return None
        if self.kind in ("ours", "stock"):
            return peft.BOFTConfig(
                boft_block_size=block_size,
                boft_n_butterfly_factor=self.m,
                boft_dropout=0.0,
                target_modules=target_modules,
            )
        if self.kind == "lora":
            return peft.LoraConfig(r=self.r, lora_alpha=2 * self.r, lora_dropout=0.0, target_modules=target_modules)
        return peft.OFTConfig(r=0, oft_block_size=block_size, module_dropout=0.0, target_modules=target_modules)


def apply_method(method: Method, model: nn.Module, block_size: int, target_modules: list[str]) -> nn.Module:
    """Return the trainable model (a ``PeftModel``, or ``model`` itself frozen for ``base``). Call inside context."""
    config = method.peft_config(block_size, target_modules)
    if config is None:
        model.requires_grad_(False)
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def boft_factor_count(model: nn.Module) -> int | None:
    """``m`` actually used by the first BOFT layer (stock PEFT on CPU silently uses 1), and a sanity check."""
    for module in model.modules():
        boft_r = getattr(module, "boft_R", None)
        if isinstance(boft_r, nn.ParameterDict) and len(boft_r):
            return int(next(iter(boft_r.values())).shape[0])
    return None


def uses_our_layers(model: nn.Module) -> bool:
    return any(type(module).__module__.startswith("boft_plugin.") for module in model.modules())


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- parameter matching ----------------------------------------------------------------------------------------
def boft_fits(width: int, block_size: int, m: int) -> bool:
    """Whether BOFT with block size ``block_size`` and ``m`` factors fits a layer of input width ``width``."""
    try:
        resolve_geometry(width, block_size, 0, m)
    except GeometryError:
        return False
    return True


def boft_params(in_features: int, out_features: int, block_size: int, m: int) -> int:
    """``boft_R`` (m, N, b, b) plus ``boft_s`` (out, 1), sized by the tuner's own geometry."""
    shape = resolve_geometry(in_features, block_size, 0, m).param_shape
    return shape[0] * shape[1] * shape[2] * shape[3] + out_features


def matched_lora_rank(target_params: int, fan_sum: int) -> int:
    """LoRA rank whose ``r * sum(in + out)`` is closest to ``target_params``."""
    return max(1, round(target_params / fan_sum))


Plan = tuple[list[Method], dict[int, str]]


def _methods(targets: dict[int, tuple[int, int]], factors: list[int]) -> Plan:
    """Methods in run order (stock last: its estimate uses the base time) and ``{m: key of the matched LoRA}``.

    ``targets[m] = (BOFT parameter count, sum of in + out over the adapted layers)``; equal ranks run once.
    """
    loras: dict[int, Method] = {}
    lora_by_m: dict[int, str] = {}
    for m in factors:
        target, fan_sum = targets[m]
        r = matched_lora_rank(target, fan_sum)
        lora_by_m[m] = loras.setdefault(r, Method("lora", m=m, r=r, matched_params=target)).key
    methods = [
        Method("base"),
        *loras.values(),
        Method("oft"),
        *(Method("ours", m=m) for m in factors),
        *(Method("stock", m=m) for m in factors),
    ]
    return methods, lora_by_m


def layer_methods(in_features: int, out_features: int, block_size: int, factors: list[int]) -> Plan:
    """Methods of one per-layer case; LoRA ranks matched to BOFT's parameters on this layer (one per distinct r)."""
    fan_sum = in_features + out_features
    return _methods({m: (boft_params(in_features, out_features, block_size, m), fan_sum) for m in factors}, factors)


def model_methods(
    linear_shapes: list[tuple[int, int]], block_size: int, factors: list[int], compiled: bool = False
) -> Plan:
    """Methods of the whole-model case; one LoRA rank per m, matched on the model's total BOFT parameters.

    ``compiled``: also the base, each matched LoRA and ours per m with every decoder layer compiled.
    """
    fan_sum = sum(i + o for i, o in linear_shapes)
    targets = {m: (sum(boft_params(i, o, block_size, m) for i, o in linear_shapes), fan_sum) for m in factors}
    methods, lora_by_m = _methods(targets, factors)
    if compiled:
        from dataclasses import replace

        methods += [replace(m, compiled=True) for m in methods if m.kind in ("base", "lora", "ours")]
    return methods, lora_by_m


# -- stock PEFT cost estimate ----------------------------------------------------------------------------------
def stock_extra_flops(width: int, tokens: int, m: int) -> float:
    """FLOPs stock PEFT BOFT adds to the frozen base in one forward+backward of one layer of input width ``n``.

    Forward: two dense ``(m, n, n)`` bmm with the permutation matrices (4 m n^3), the chain of m-1 products and
    the product with the identity (2 m n^3), and ``x @ R`` (2 T n^2). Backward: one matmul per bmm (4 m n^3),
    two per chain product (4 (m-1) n^3), one for the identity product (2 n^3), two for ``x @ R`` (4 T n^2).
    """
    n = width
    return n**3 * (8 * m + 6 * (m - 1) + 4) + 6 * tokens * n**2


class StockEstimator:
    """Estimated stock-PEFT step time = base step + extra FLOPs at the current matmul rate, times a correction.

    The rate is re-measured before each case's stock rows (``recalibrate``), so that load from other processes at
    that moment is accounted for; the correction is the median measured/estimated ratio of the last three stock
    rows that ran (their warm-up step), clamped to [0.5, 2] so that one noisy row cannot skip everything after it.
    """

    def __init__(self, calibrate: Callable[[], float]):
        self._calibrate = calibrate
        self.gflops = calibrate()
        self.ratios: list[float] = []

    def recalibrate(self) -> float:
        self.gflops = self._calibrate()
        return self.gflops

    @property
    def correction(self) -> float:
        if not self.ratios:
            return 1.0
        return min(2.0, max(0.5, statistics.median(self.ratios[-3:])))

    def raw_seconds(self, base_ms: float | None, extra_flops: float) -> float:
        return (base_ms or 0.0) / 1e3 + extra_flops / (self.gflops * 1e9)

    def seconds(self, base_ms: float | None, extra_flops: float) -> float:
        return self.raw_seconds(base_ms, extra_flops) * self.correction

    def observe(self, raw_seconds: float, measured_seconds: float) -> None:
        if raw_seconds > 0:
            self.ratios.append(measured_seconds / raw_seconds)
