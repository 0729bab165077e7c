"""``boft-plugin convert --to-lora``: an adapter directory converted with the base weights read tensor by tensor.

No model is built for the conversion: each adapted layer's base weight is read from the base model's safetensors
checkpoint, converted (:func:`.lora.convert_layer`) and dropped. The probe afterwards (:mod:`.lora_probe`) loads the
whole model once in this process, as ``verify`` does (``probe=False`` / ``--no-probe`` skips it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import Tensor

from ..errors import LoraConversionError
from .layout import ADAPTER_CONFIG, LORA_REPORT, TOKENIZER_FILES
from .lora import KIND, PEFT_PREFIX, check_servable_config, convert_layer, lora_config, lora_tensors, write_lora_files
from .lora_report import LoraOptions, LoraReport, budget_error
from .publish import ADAPTER_WEIGHTS as ADAPTER_WEIGHT_FILES
from .publish import owns_directory, publish_export

__all__ = ["convert_to_lora"]


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
    check_servable_config(config, str(source / ADAPTER_CONFIG))
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
        tensors.update(lora_tensors(name, lora_a, lora_b, tuple(weight.shape) if weight.dim() == 4 else None))
        del weight, matrix
    if not report.budget_met:
        raise budget_error(report)
    new_config = lora_config(dict(config, base_model_name_or_path=base_path), {x.name: x.rank for x in report.layers})
    with publish_export(target, KIND, ADAPTER_WEIGHT_FILES) as staging:
        write_lora_files(staging, new_config, tensors, report)
        for name in TOKENIZER_FILES:
            entry = source / name
            if entry.is_file() and not entry.is_symlink():
                shutil.copyfile(entry, staging / name)
        if probe:
            from .lora_probe import probe_conversion

            report.probe = probe_conversion(source, staging, base_path, prompt_file)
            (staging / LORA_REPORT).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report
