"""Read and check a PEFT BOFT adapter before anything is loaded; load it only if it fits.

Every problem is reported with the file, the key or module, the value found and what would be valid; nothing
the user had (files, model) is modified when a check fails. Weights are read only from safetensors, or, when the
caller opts in with ``allow_pickle=True``, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["AdapterCheckpoint", "BoftCheckpointError", "check_adapter_tensors", "load_adapter", "read_adapter"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


class BoftCheckpointError(ValueError):
    """An adapter checkpoint cannot be loaded as it is; nothing was loaded or changed."""


@dataclass
class AdapterCheckpoint:
    path: Path
    config: dict
    tensors: dict[str, Tensor]
    weights_file: Path


def _read_config(path: Path) -> dict:
    file = path / CONFIG_NAME
    if not file.is_file():
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise BoftCheckpointError(f"{file}: missing (the directory holds {found}); a PEFT adapter needs {CONFIG_NAME}")
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BoftCheckpointError(f"{file}: not valid JSON ({err}); the file is damaged, copy it again") from None
    if not isinstance(config, dict):
        raise BoftCheckpointError(f"{file}: expected a JSON object, found {type(config).__name__}")
    if config.get("peft_type") != "BOFT":
        raise BoftCheckpointError(
            f"{file}: peft_type is {config.get('peft_type')!r}; boft-plugin loads 'BOFT' adapters"
        )
    return config


def _read_weights(path: Path, allow_pickle: bool) -> tuple[dict[str, Tensor], Path]:
    safetensors_file, pickle_file = path / SAFETENSORS_NAME, path / PICKLE_NAME
    if safetensors_file.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(safetensors_file), safetensors_file
        except (SafetensorError, OSError, RuntimeError) as err:
            size = safetensors_file.stat().st_size
            raise BoftCheckpointError(
                f"{safetensors_file}: truncated or corrupted ({size} bytes; safetensors says: {err}). Copy the file "
                "again from where it was written; nothing was loaded"
            ) from None
    if pickle_file.is_file():
        if not allow_pickle:
            raise BoftCheckpointError(
                f"{pickle_file}: a pickle-based checkpoint, which is refused by default (unpickling can run code). "
                "Pass allow_pickle=True to read it with torch.load(weights_only=True), or re-save the adapter as "
                f"{SAFETENSORS_NAME}"
            )
        try:
            return torch.load(pickle_file, map_location="cpu", weights_only=True), pickle_file
        except Exception as err:  # noqa: BLE001 - any failure of the restricted unpickler is reported the same way
            raise BoftCheckpointError(f"{pickle_file}: cannot be read with weights_only=True ({err})") from None
    found = sorted(p.name for p in path.iterdir())
    raise BoftCheckpointError(f"{path}: no {SAFETENSORS_NAME} (or {PICKLE_NAME}) in the directory (found {found})")


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> AdapterCheckpoint:
    """Read ``adapter_config.json`` and the weights of a local adapter directory, checking both can be read."""
    path = Path(path)
    if not path.is_dir():
        raise BoftCheckpointError(f"{path}: not a directory (an adapter is a directory with {CONFIG_NAME} and weights)")
    config = _read_config(path)
    tensors, weights_file = _read_weights(path, allow_pickle)
    return AdapterCheckpoint(path=path, config=config, tensors=tensors, weights_file=weights_file)


def _module_of(key: str) -> tuple[str, str] | None:
    """``'base_model.model.a.b.boft_R'`` -> ``('a.b', 'boft_R')``; None for non-adapter keys."""
    for suffix in ("boft_R", "boft_s"):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1].removeprefix(PEFT_PREFIX), suffix
    return None


def check_adapter_tensors(
    tensors: dict[str, Tensor], expected: dict[str, dict[str, tuple[int, ...]]], config: dict
) -> list[str]:
    """Problems of a checkpoint's tensors against the expected shapes (``{module: {"boft_R": shape, ...}}``)."""
    problems: list[str] = []
    found: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            problems.append(f"{key}: {bad} of {tensor.numel()} values are NaN or Inf")
        owner = _module_of(key)
        if owner:
            found.setdefault(owner[0], {})[owner[1]] = tensor
    m_config = config.get("boft_n_butterfly_factor")
    for module, shapes in expected.items():
        if module not in found:
            problems.append(f"{module}: targeted by the config in this model, but the file has no tensors for it")
            continue
        for name, shape in shapes.items():
            tensor = found[module].get(name)
            if tensor is None:
                problems.append(f"{PEFT_PREFIX}{module}.{name}: missing from the file")
            elif tuple(tensor.shape) != tuple(shape):
                message = (
                    f"{PEFT_PREFIX}{module}.{name}: shape {tuple(tensor.shape)} in the file, {tuple(shape)} expected"
                )
                if name == "boft_R" and tuple(tensor.shape[1:]) == tuple(shape[1:]) and tensor.shape[0] != shape[0]:
                    message += (
                        f" (adapter_config.json says boft_n_butterfly_factor={m_config} but the tensors hold "
                        f"{tensor.shape[0]} factor(s)"
                    )
                    message += (
                        ": this is what stock PEFT writes when its CUDA extension cannot build, it trains with one "
                        "factor and keeps the configured value in the file)"
                        if tensor.shape[0] == 1
                        else ")"
                    )
                problems.append(message)
    extra = sorted(set(found) - set(expected))
    for module in extra:
        problems.append(
            f"{PEFT_PREFIX}{module}: the file has an adapter for this module, which this model does not have or the "
            "config does not target (an adapter for another base model?)"
        )
    if any("factor(s)" in p for p in problems):
        problems.append(
            "remedy: load the adapter as what it really is with boft_plugin.load_adapter(model, path, "
            "butterfly_factor='tensors') (or set boft_n_butterfly_factor to the tensors' count in "
            f"{CONFIG_NAME})"
        )
    return problems


def _expected_shapes(model: nn.Module, config) -> dict[str, dict[str, tuple[int, ...]]]:
    from .tuner.targets import plan_targets

    plans, problems = plan_targets(model, config)
    if problems:
        raise BoftCheckpointError("the adapter's config does not fit this model:\n  - " + "\n  - ".join(problems))
    return {name: {"boft_R": plan.geometry.param_shape, "boft_s": plan.scale_shape} for name, plan in plans.items()}


def _factors_in_tensors(checkpoint: AdapterCheckpoint) -> int:
    counts = {int(t.shape[0]) for k, t in checkpoint.tensors.items() if k.endswith(".boft_R") and t.dim() == 4}
    if len(counts) != 1:
        raise BoftCheckpointError(
            f"{checkpoint.weights_file}: boft_R tensors disagree on the number of butterfly factors ({sorted(counts)})"
        )
    return counts.pop()


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
    allow_pickle: bool = False,
    butterfly_factor: str = "config",
):
    """Check a local BOFT adapter against ``model`` and load it; raise before changing anything if it does not fit.

    Args:
        model: a base model (returns a new ``PeftModel``) or a ``PeftModel`` (the adapter is added to it).
        butterfly_factor: ``"config"`` (the file's ``boft_n_butterfly_factor``) or ``"tensors"`` (the number of
            factors the ``boft_R`` tensors really hold: how to load stock-PEFT adapters trained without its CUDA
            extension, whose config claims more factors than were trained).

    Returns:
        The ``PeftModel``.
    """
    from peft import BOFTConfig, PeftModel

    from .registry import register

    if butterfly_factor not in ("config", "tensors"):
        raise ValueError(f"butterfly_factor must be 'config' or 'tensors', got {butterfly_factor!r}")
    checkpoint = read_adapter(path, allow_pickle=allow_pickle)
    fields = {k: v for k, v in checkpoint.config.items() if k in BOFTConfig.__dataclass_fields__}
    try:
        config = BOFTConfig(**fields)
    except (TypeError, ValueError) as err:
        raise BoftCheckpointError(f"{checkpoint.path / CONFIG_NAME}: invalid BOFT config ({err})") from None
    if butterfly_factor == "tensors":
        config.boft_n_butterfly_factor = _factors_in_tensors(checkpoint)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    problems = check_adapter_tensors(checkpoint.tensors, _expected_shapes(base, config), fields)
    if problems:
        raise BoftCheckpointError(
            f"{checkpoint.weights_file}: cannot be loaded into this model; nothing was changed:\n  - "
            + "\n  - ".join(problems)
        )
    register()
    config.inference_mode = not is_trainable
    if isinstance(model, PeftModel):
        model.load_adapter(str(checkpoint.path), adapter_name, is_trainable=is_trainable, peft_config=config)
        return model
    return PeftModel.from_pretrained(
        model, str(checkpoint.path), adapter_name, is_trainable=is_trainable, config=config
    )
