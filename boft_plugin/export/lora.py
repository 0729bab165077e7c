"""BOFT adapters as standard PEFT LoRA adapters, for servers that serve LoRA only (vLLM, SGLang, ...).

A BOFT layer's merged weight is ``W' = diag(s) W B^T`` (the bias is unchanged, as in PEFT's maths), so the LoRA
adapter that reproduces it carries the weight delta ``D = W' - W``, which is full-rank in general. Each layer's
delta is computed in float64 from the base weight and the adapter, and its truncated SVD ``B @ A`` is written
(:mod:`..ops.low_rank`); the error that truncation costs is reported per layer, never hidden.

Two drivers share the per-layer conversion:

- :func:`export_lora` converts a live (possibly sharded) model: collective, one gathered base weight at a time;
- :func:`convert_to_lora` converts an adapter directory, reading the base weights tensor by tensor from the base
  model's safetensors checkpoint (no model is built), then measures the whole-model effect on a probe
  (:mod:`.lora_probe`).

The written ``adapter_config.json`` has ``lora_alpha == r`` and, where layer ranks differ, ``rank_pattern`` and
``alpha_pattern`` with ``alpha == rank`` per layer: the LoRA scaling ``alpha / r`` is 1 for every layer whether a
loader honours the patterns (PEFT) or reads ``lora_alpha / r`` once (vLLM). It has no ``modules_to_save``, no
DoRA, no bias: nothing a LoRA-only server refuses. See docs/lora.md.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import LoraBudgetError, LoraConversionError
from ..ops.low_rank import RankChoice, choose_rank, lora_factors, spectrum_of
from .layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_REPORT, TOKENIZER_FILES
from .publish import ADAPTER_WEIGHTS as ADAPTER_WEIGHT_FILES
from .publish import owns_directory, publish_export

__all__ = [
    "SERVER_RANKS",
    "LayerConversion",
    "LoraOptions",
    "LoraReport",
    "convert_to_lora",
    "export_lora",
]

# the LoRA ranks a server accepts as its maximum rank; vLLM's --max-lora-rank choices (vllm.config.LoRAConfig)
SERVER_RANKS: dict[str, tuple[int, ...]] = {"vllm": (1, 8, 16, 32, 64, 128, 256, 320, 512)}
KIND = "lora_adapter"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraOptions:
    """How ranks are chosen: ``rank`` for every layer, or the smallest rank meeting ``max_error`` (relative
    Frobenius error of each layer's delta), capped by ``max_rank``; ``ranks`` names a server whose allowed ranks
    every layer's rank is snapped up to (:data:`SERVER_RANKS`)."""

    rank: int | None = None
    max_error: float | None = None
    max_rank: int | None = None
    ranks: str | None = None

    def check(self) -> None:
        """Raise :class:`LoraConversionError` for options that cannot work (before anything is read)."""
        if (self.rank is None) == (self.max_error is None):
            raise LoraConversionError("give exactly one of rank (--rank R) and max_error (--max-error E)")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise LoraConversionError(f"rank must be a positive integer, got {self.rank!r}")
        if self.max_error is not None and not (0.0 <= self.max_error < 1.0):
            raise LoraConversionError(f"max_error is a relative error in [0, 1), got {self.max_error!r}")
        if self.max_rank is not None:
            if self.rank is not None:
                raise LoraConversionError("max_rank caps the rank an error budget chooses; with rank it is not used")
            if not isinstance(self.max_rank, int) or self.max_rank < 1:
                raise LoraConversionError(f"max_rank must be a positive integer, got {self.max_rank!r}")
        if self.ranks is not None:
            if self.ranks not in SERVER_RANKS:
                raise LoraConversionError(f"ranks={self.ranks!r}: known servers are {sorted(SERVER_RANKS)}")
            allowed = SERVER_RANKS[self.ranks]
            if self.rank is not None and self.rank not in allowed:
                raise LoraConversionError(f"rank {self.rank} is not one of {self.ranks}'s ranks {list(allowed)}")
            if self.max_rank is not None and self.max_rank < min(allowed):
                raise LoraConversionError(f"max_rank {self.max_rank} is below every {self.ranks} rank {list(allowed)}")

    @property
    def allowed(self) -> tuple[int, ...] | None:
        return SERVER_RANKS[self.ranks] if self.ranks else None

    def choose(self, spectrum) -> RankChoice:
        return choose_rank(spectrum, self.rank, self.max_error, self.max_rank, self.allowed)


@dataclass(frozen=True)
class LayerConversion:
    """One layer's conversion: its module path, delta shape ``(out, width)``, rank and what the rank costs."""

    name: str
    shape: tuple[int, int]
    full_rank: int
    rank: int
    relative_error: float
    energy_kept: float
    budget_met: bool


@dataclass
class LoraReport:
    """Every layer's figures, whether the budget was met, and (from :func:`convert_to_lora`) the probe."""

    options: LoraOptions
    layers: list[LayerConversion] = field(default_factory=list)
    probe: dict | None = None
    source: str | None = None

    @property
    def failing(self) -> list[str]:
        return [layer.name for layer in self.layers if not layer.budget_met]

    @property
    def budget_met(self) -> bool:
        return not self.failing

    def as_dict(self) -> dict:
        errors = [layer.relative_error for layer in self.layers]
        return {
            "source": self.source,
            "options": asdict(self.options),
            "layers_converted": len(self.layers),
            "ranks": sorted({layer.rank for layer in self.layers}),
            "max_relative_error": max(errors, default=0.0),
            "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
            "min_energy_kept": min((layer.energy_kept for layer in self.layers), default=1.0),
            "lora_values": sum(layer.rank * sum(layer.shape) for layer in self.layers),
            "budget_met": self.budget_met,
            "over_budget": self.failing,
            "probe": self.probe,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def summary_lines(self) -> list[str]:
        """A short human-readable account (the CLI prints it to stderr; the JSON goes to stdout and the file)."""
        data = self.as_dict()
        lines = [
            f"{data['layers_converted']} layers, ranks {data['ranks']}, relative delta error max "
            f"{data['max_relative_error']:.3e} mean {data['mean_relative_error']:.3e}, energy kept >= "
            f"{data['min_energy_kept']:.6f}"
        ]
        if self.probe:
            lines.append(
                f"probe ({self.probe['tokens']} tokens): logit error {self.probe['logit_rel_err']:.3e}, KL(BOFT||LoRA) "
                f"mean {self.probe['kl_mean']:.3e} max {self.probe['kl_max']:.3e}; the adapter itself moves the base "
                f"by KL {self.probe['adapter_kl_mean']:.3e}"
            )
        if self.failing:
            lines.append(f"over budget ({len(self.failing)} layers): {', '.join(self.failing)}")
        return lines


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


def _check_boft_config(config: dict, where: str) -> None:
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


def _lora_tensors(name: str, lora_a: Tensor, lora_b: Tensor, conv_shape: tuple[int, ...] | None) -> dict[str, Tensor]:
    """PEFT's LoRA keys (adapter name stripped, as ``save_pretrained`` writes them); Conv2d factors as 4-D
    kernels (``A`` ``(r, in, kh, kw)``, ``B`` ``(out, r, 1, 1)``)."""
    if conv_shape is not None:
        lora_a = lora_a.reshape(lora_a.shape[0], *conv_shape[1:])
        lora_b = lora_b.reshape(*lora_b.shape, 1, 1)
    return {
        f"{PEFT_PREFIX}{name}.lora_A.weight": lora_a.contiguous(),
        f"{PEFT_PREFIX}{name}.lora_B.weight": lora_b.contiguous(),
    }


def _write(staging: Path, config: dict, tensors: dict[str, Tensor], report: LoraReport) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (staging / LORA_REPORT).write_text(json.dumps(report.as_dict(), indent=2) + "\n")


def _budget_error(report: LoraReport) -> LoraBudgetError:
    over = [layer for layer in report.layers if not layer.budget_met]
    worst = ", ".join(f"{layer.name} ({layer.relative_error:.3e} at rank {layer.rank})" for layer in over[:8])
    more = f" and {len(over) - 8} more" if len(over) > 8 else ""
    cap = report.options.max_rank or (max(report.options.allowed) if report.options.allowed else None)
    return LoraBudgetError(
        f"no allowed rank{f' (<= {cap})' if cap else ''} meets max_error={report.options.max_error} for "
        f"{len(over)} of {len(report.layers)} layers: {worst}{more}; nothing was written. Allow a larger rank, a "
        "larger error, or ship the merged model",
        report,
    )


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
        _check_boft_config(boft_config, f"adapter {adapter!r}")
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
    with torch.no_grad():
        for name, layer in layers:
            weight = layer.get_base_layer().weight
            source = float_weights.get(weight)
            value = source.read() if source else full_tensor(weight, prefer_fp32_master=False)  # collective
            rotations = [
                (layer.to_peft_layout(a, full_tensor(layer.boft_R[a])), full_tensor(layer.boft_s[a]))
                for a in layer.active_boft_adapters()
            ]
            if writer:
                matrix = layer.weight_to_matrix(value)
                figures, lora_a, lora_b = convert_layer(name, matrix, rotations, options)
                report.layers.append(figures)
                conv_shape = tuple(value.shape) if value.dim() == 4 else None
                tensors.update(_lora_tensors(name, lora_a, lora_b, conv_shape))
            del value, rotations
    failure = None
    if writer:
        try:
            if not report.budget_met:
                raise _budget_error(report)
            config = lora_config(boft_config, {layer.name: layer.rank for layer in report.layers})
            with publish_export(output_dir, KIND, ADAPTER_WEIGHT_FILES) as staging:
                _write(staging, config, tensors, report)
                if extra_files is not None:
                    extra_files(staging)
        except Exception as err:  # noqa: BLE001 - every rank raises it below
            failure = err
    raise_if_any_rank_failed(failure)
    return report if writer else None


# -- driver 2: an adapter directory and the base checkpoint, tensor by tensor ------------------------------------------


def _base_weights(base_path: str, where: str):
    from ..distributed.checkpoint_files import CheckpointIndex

    root = Path(base_path)
    config_file = root / "config.json"
    if not root.is_dir():
        raise LoraConversionError(
            f"{where}: the base model {base_path!r} is not a local directory; the delta needs the base weights "
            "(pass --base_model PATH to a safetensors checkpoint)"
        )
    if config_file.is_file() and "quantization_config" in json.loads(config_file.read_text()):
        raise LoraConversionError(
            f"{base_path}: a quantised checkpoint; the LoRA delta is computed against full-precision weights "
            "(pass --base_model PATH to the full-precision checkpoint)"
        )
    try:
        return CheckpointIndex(root)
    except (FileNotFoundError, OSError, ValueError) as err:
        raise LoraConversionError(f"{base_path}: {err}") from None


def _read_base_weight(index, module: str) -> Tensor:
    from safetensors import safe_open

    first = module.split(".", 1)[0]
    key = index.resolve([f"{module}.weight"], first)
    if key is None:
        raise LoraConversionError(
            f"{index.root}: no weight {module}.weight for the adapted layer {module}; is this the adapter's base model?"
        )
    with safe_open(index.key_to_file[key], framework="pt", device="cpu") as handle:
        return handle.get_tensor(key)


def _adapter_layers(tensors: dict[str, Tensor], where: str) -> list[str]:
    """Module paths (under ``base_model.model.``) of the adapter's layers; refuses tensors that are not BOFT's."""
    names, other = set(), []
    for key in tensors:
        stem, _, leaf = key.rpartition(".")
        if leaf in ("boft_R", "boft_s") and stem.startswith(PEFT_PREFIX):
            names.add(stem[len(PEFT_PREFIX) :])
        else:
            other.append(key)
    if other:
        raise LoraConversionError(
            f"{where}: tensors other than boft_R/boft_s ({', '.join(sorted(other)[:4])}); a LoRA adapter cannot "
            "carry trained whole modules that a LoRA-only server would serve"
        )
    if not names:
        raise LoraConversionError(f"{where}: no boft_R tensors")
    return sorted(names, key=_natural_key)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def convert_to_lora(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    rank: int | None = None,
    max_error: float | None = None,
    max_rank: int | None = None,
    ranks: str | None = None,
    base_model: str | None = None,
    probe: bool = True,
    prompt_file: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> LoraReport:
    """Convert the BOFT adapter directory ``source`` (ours or stock PEFT's) into a LoRA adapter in ``target``.

    The base weights are read one tensor at a time from ``base_model`` (default: the adapter config's
    ``base_model_name_or_path``), a local full-precision safetensors checkpoint; no model is built for the
    conversion. With ``probe`` the LoRA adapter is then loaded by stock PEFT onto the base model and compared with
    the BOFT model on ``prompt_file``'s text, the saved ``probe_logits.pt`` input, or a fixed sentence
    (:mod:`.lora_probe`; this step holds the whole model in this process). ``target`` follows the single-factor
    conversion's rules: a directory holding only an earlier conversion is replaced whole, any other non-empty one
    is refused unless ``overwrite``. Raises :class:`LoraBudgetError` (nothing written) when ``max_error`` cannot
    be met, :class:`LoraConversionError` for anything else wrong, before the expensive work where it can.
    """
    from .loading import read_adapter

    options = LoraOptions(rank, max_error, max_rank, ranks)
    options.check()
    source, target = Path(source), Path(target)
    if target.exists() and source.exists() and source.resolve() == target.resolve():
        raise LoraConversionError(f"{target}: convert into another directory, the BOFT adapter is kept as it is")
    if not owns_directory(target, KIND) and not overwrite:
        raise LoraConversionError(f"{target} exists and is not empty; choose a new directory or pass overwrite")
    if prompt_file is not None and not Path(prompt_file).is_file():
        raise LoraConversionError(f"{prompt_file}: no such prompt file")
    try:
        checkpoint = read_adapter(source)
    except ValueError as err:
        raise LoraConversionError(str(err)) from None
    config = checkpoint.config
    _check_boft_config(config, str(source / ADAPTER_CONFIG))
    names = _adapter_layers(checkpoint.tensors, str(checkpoint.weights_file))
    base_path = base_model or config.get("base_model_name_or_path")
    if not base_path:
        raise LoraConversionError(f"{source / ADAPTER_CONFIG}: no base_model_name_or_path; pass --base_model PATH")
    index = _base_weights(base_path, str(source))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    report = LoraReport(options, source=str(source))
    tensors: dict[str, Tensor] = {}
    for name in names:
        weight = _read_base_weight(index, name)
        boft_r = checkpoint.tensors[f"{PEFT_PREFIX}{name}.boft_R"]
        boft_s = checkpoint.tensors[f"{PEFT_PREFIX}{name}.boft_s"]
        if weight.dim() == 4:
            matrix = weight.reshape(weight.shape[0], -1)
        else:
            matrix = weight.T if fan_in_fan_out else weight
        width = int(boft_r.shape[1] * boft_r.shape[-1])
        if matrix.shape[1] != width or boft_s.numel() != matrix.shape[0]:
            raise LoraConversionError(
                f"{name}: base weight {tuple(weight.shape)} does not fit the adapter (boft_R {tuple(boft_r.shape)}, "
                f"boft_s {tuple(boft_s.shape)}); is {base_path} the adapter's base model?"
            )
        figures, lora_a, lora_b = convert_layer(name, matrix, [(boft_r, boft_s)], options)
        report.layers.append(figures)
        tensors.update(_lora_tensors(name, lora_a, lora_b, tuple(weight.shape) if weight.dim() == 4 else None))
        del weight, matrix
    if not report.budget_met:
        raise _budget_error(report)
    new_config = lora_config(dict(config, base_model_name_or_path=base_path), {x.name: x.rank for x in report.layers})
    with publish_export(target, KIND, ADAPTER_WEIGHT_FILES) as staging:
        _write(staging, new_config, tensors, report)
        for name in TOKENIZER_FILES:
            entry = source / name
            if entry.is_file() and not entry.is_symlink():
                shutil.copyfile(entry, staging / name)
        if probe:
            from .lora_probe import probe_conversion

            report.probe = probe_conversion(source, staging, base_path, prompt_file)
            (staging / LORA_REPORT).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report
