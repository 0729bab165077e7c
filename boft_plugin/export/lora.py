"""BOFT adapters as standard PEFT LoRA adapters, for servers that serve LoRA only (vLLM, SGLang, ...).

A BOFT layer's merged weight is ``W' = diag(s) W B^T`` (the bias is unchanged, as in PEFT's maths), so the LoRA
adapter that reproduces it carries the weight delta ``D = W' - W``, which is full-rank in general. Each layer's
delta is computed in float64 from the base weight and the adapter, and its truncated SVD ``B @ A`` is written
(:mod:`..ops.low_rank`); the error that truncation costs is reported per layer, never hidden.

Two drivers share the per-layer conversion and the files written here:

- :func:`export_lora` (here) converts a live (possibly sharded) model: collective, one gathered base weight at a
  time;
- :func:`.lora_convert.convert_to_lora` converts an adapter directory, reading the base weights tensor by tensor
  from the base model's safetensors checkpoint (no model is built), then measures the whole-model effect on a
  probe (:mod:`.lora_probe`).

The written ``adapter_config.json`` has ``lora_alpha == r`` and, where layer ranks differ, ``rank_pattern`` and
``alpha_pattern`` with ``alpha == rank`` per layer: the LoRA scaling ``alpha / r`` is 1 for every layer whether a
loader honours the patterns (PEFT) or reads ``lora_alpha / r`` once (vLLM). It has no ``modules_to_save``, no
DoRA, no bias: nothing a LoRA-only server refuses. See docs/lora.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import LoraConversionError
from ..ops.low_rank import lora_factors, spectrum_of
from .layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_REPORT
from .lora_report import LayerConversion, LoraOptions, LoraReport, budget_error
from .publish import ADAPTER_WEIGHTS as ADAPTER_WEIGHT_FILES
from .publish import publish_export

__all__ = [
    "KIND",
    "PEFT_PREFIX",
    "adapter_delta",
    "check_servable_config",
    "convert_layer",
    "export_lora",
    "lora_config",
    "lora_tensors",
    "write_lora_files",
]

KIND = "lora_adapter"
PEFT_PREFIX = "base_model.model."


# -- the per-layer conversion (pure maths on one layer) ---------------------------------------------------------------


def adapter_delta(matrix: Tensor, rotations: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``W' - W`` in float64 for a base weight ``matrix`` ``(out, width)`` and ``(boft_R (m, N, b, b), boft_s)``
    pairs applied in PEFT's merge order."""
    from ..tuner.layer import merge_matrix

    base = matrix.double()
    merged = base
    for boft_r, boft_s in rotations:
        merged = merge_matrix(merged, boft_r.double(), boft_s.double())
    return merged - base


def convert_layer(
    name: str, matrix: Tensor, rotations: list[tuple[Tensor, Tensor]], options: LoraOptions
) -> tuple[LayerConversion, Tensor, Tensor]:
    """One layer: its delta, SVD, rank; returns the figures and LoRA ``A`` ``(r, width)``, ``B`` ``(out, r)`` as
    float32 on the CPU."""
    delta = adapter_delta(matrix, rotations)
    spectrum = spectrum_of(delta)
    choice = options.choose(spectrum)
    lora_a, lora_b = lora_factors(spectrum, choice.rank)
    figures = LayerConversion(
        name=name,
        shape=(int(delta.shape[0]), int(delta.shape[1])),
        full_rank=spectrum.full_rank,
        rank=choice.rank,
        relative_error=choice.relative_error,
        energy_kept=choice.energy_kept,
        budget_met=choice.budget_met,
    )
    return figures, lora_a.float().cpu(), lora_b.float().cpu()


# -- writing ---------------------------------------------------------------------------------------------------------


def check_servable_config(config: dict, where: str) -> None:
    if config.get("peft_type") != "BOFT":
        raise LoraConversionError(f"{where}: peft_type is {config.get('peft_type')!r}, not 'BOFT'")
    for key in ("modules_to_save", "trainable_token_indices"):
        if config.get(key):
            raise LoraConversionError(
                f"{where}: {key}={config[key]!r}; a LoRA-only server refuses whole trained modules (vLLM: "
                "'only supports modules_to_save being None'), so this adapter cannot be served as LoRA. Ship the "
                "merged model instead (recipe key export_merged, boft_plugin.export_merged)"
            )


def lora_config(boft_config: dict, ranks: dict[str, int]) -> dict:
    """``adapter_config.json`` of the LoRA adapter: PEFT's own ``LoraConfig`` (every key PEFT writes), targeting
    exactly the converted layers, scaling 1 per layer (see the module docstring)."""
    from peft import LoraConfig

    top = max(ranks.values())
    different = {name: rank for name, rank in ranks.items() if rank != top}
    config = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(ranks),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=bool(boft_config.get("fan_in_fan_out", False)),
        modules_to_save=None,
        use_rslora=False,
        use_dora=False,
        init_lora_weights=True,
        rank_pattern=different,
        alpha_pattern=dict(different),
        task_type=boft_config.get("task_type"),
        base_model_name_or_path=boft_config.get("base_model_name_or_path"),
        revision=boft_config.get("revision"),
        inference_mode=True,
    )
    data = config.to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in data.items()}


def lora_tensors(name: str, lora_a: Tensor, lora_b: Tensor, conv_shape: tuple[int, ...] | None) -> dict[str, Tensor]:
    """PEFT's LoRA keys (adapter name stripped, as ``save_pretrained`` writes them); Conv2d factors as 4-D
    kernels (``A`` ``(r, in, kh, kw)``, ``B`` ``(out, r, 1, 1)``)."""
    if conv_shape is not None:
        lora_a = lora_a.reshape(lora_a.shape[0], *conv_shape[1:])
        lora_b = lora_b.reshape(*lora_b.shape, 1, 1)
    return {
        f"{PEFT_PREFIX}{name}.lora_A.weight": lora_a.contiguous(),
        f"{PEFT_PREFIX}{name}.lora_B.weight": lora_b.contiguous(),
    }


def write_lora_files(staging: Path, config: dict, tensors: dict[str, Tensor], report: LoraReport) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (staging / LORA_REPORT).write_text(json.dumps(report.as_dict(), indent=2) + "\n")


# -- driver 1: a live (possibly sharded) model ------------------------------------------------------------------------


def _boft_layers(peft_model) -> Iterator[tuple[str, nn.Module]]:
    from ..tuner.layer import BoftLayer

    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, BoftLayer) and module.active_boft_adapters():
            yield name, module


def export_lora(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    rank: int | None = None,
    max_error: float | None = None,
    max_rank: int | None = None,
    ranks: str | None = None,
    extra_files: Callable[[Path], None] | None = None,
) -> LoraReport | None:
    """Write the model's active BOFT adapter(s) as a PEFT LoRA adapter in ``output_dir`` (+ ``lora_conversion.json``).

    Collective: every rank calls it (one process, DDP, ZeRO-1/2/3, FSDP2). Layer by layer, every rank gathers the
    base weight and the adapter tensors (one layer at a time); global rank 0 computes the delta and its SVD and
    keeps only the LoRA factors. Raises :class:`LoraBudgetError` on every rank, writing nothing, when ``max_error``
    cannot be met for some layer. Returns the report on rank 0, None on the others. A quantised base's delta is
    taken against its full-precision weights (:mod:`.quantised_source`), as :func:`.merged.export_merged` does.
    """
    from ..distributed.gather import full_tensor, settle_zero3, unwrap_peft_model
    from ..runtime.ranks import raise_if_any_rank_failed
    from ..runtime.ranks import rank as global_rank
    from .quantised_source import FloatWeights

    options = LoraOptions(rank, max_error, max_rank, ranks)
    options.check()
    settle_zero3(model)
    peft_model = unwrap_peft_model(model)
    adapter = peft_model.active_adapters[0]
    boft_config = peft_model.peft_config[adapter].to_dict()
    boft_config = {k: sorted(v) if isinstance(v, set) else v for k, v in boft_config.items()}
    layers = list(_boft_layers(peft_model))
    writer = global_rank() == 0
    failure = None
    try:
        check_servable_config(boft_config, f"adapter {adapter!r}")
        if not layers:
            raise LoraConversionError("the model has no active BOFT adapter layers to convert")
        merged = [name for name, layer in layers if layer.merged]
        if merged:
            raise LoraConversionError(f"{merged[0]} has its adapter merged into the weight; unmerge it first")
    except LoraConversionError as err:
        failure = err
    raise_if_any_rank_failed(failure)
    float_weights = FloatWeights(peft_model.get_base_model())
    report = LoraReport(options, source="model")
    tensors: dict[str, Tensor] = {}
    # a failure on one rank (a checkpoint read, an SVD) is kept and raised by every rank after the loop: the others
    # keep gathering with it, so no rank is left alone in a collective
    with torch.no_grad():
        for name, layer in layers:
            weight = layer.get_base_layer().weight
            source = float_weights.get(weight)
            value = None
            if source is None:
                value = full_tensor(weight, prefer_fp32_master=False)  # collective
            elif failure is None:
                try:
                    value = source.read()
                except Exception as err:  # noqa: BLE001 - raised on every rank below
                    failure = err
            rotations = [
                (layer.to_peft_layout(a, full_tensor(layer.boft_R[a])), full_tensor(layer.boft_s[a]))
                for a in layer.active_boft_adapters()
            ]
            if writer and failure is None:
                try:
                    figures, lora_a, lora_b = convert_layer(name, layer.weight_to_matrix(value), rotations, options)
                    report.layers.append(figures)
                    conv_shape = tuple(value.shape) if value.dim() == 4 else None
                    tensors.update(lora_tensors(name, lora_a, lora_b, conv_shape))
                except Exception as err:  # noqa: BLE001 - raised on every rank below
                    failure = err
            del value, rotations
    if writer and failure is None:
        try:
            if not report.budget_met:
                raise budget_error(report)
            config = lora_config(boft_config, {layer.name: layer.rank for layer in report.layers})
            with publish_export(output_dir, KIND, ADAPTER_WEIGHT_FILES) as staging:
                write_lora_files(staging, config, tensors, report)
                if extra_files is not None:
                    extra_files(staging)
        except Exception as err:  # noqa: BLE001 - every rank raises it below
            failure = err
    raise_if_any_rank_failed(failure)
    return report if writer else None
