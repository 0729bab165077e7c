"""Adapter directories on disk: read and check a PEFT BOFT adapter before anything is loaded; load it only if it fits.

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

from ..errors import BoftCheckpointError
from ..tuner.state_dict import Shapes, check_adapter_tensors, planned_adapter_shapes

__all__ = ["AdapterCheckpoint", "BoftCheckpointError", "load_adapter", "read_adapter"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


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


def _expected_shapes(model: nn.Module, config) -> Shapes:
    from ..tuner.targets import plan_targets

    plans, problems = plan_targets(model, config)
    if problems:
        raise BoftCheckpointError("the adapter's config does not fit this model:\n  - " + "\n  - ".join(problems))
    return planned_adapter_shapes(plans)


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

    from ..tuner.registry import register

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
