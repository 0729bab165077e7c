"""Refuse, before anything is written, to write into an ``output_dir`` that holds another run's adapter or model.

A directory this recipe could have written itself (a BOFT adapter for the same base model with the same geometry:
a resumed run, a re-export) is fine. Anything else needs ``overwrite_output_dir: true``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import RecipeError

_MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_GEOMETRY_KEYS = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor")


def same_base(recorded: str | None, base: str) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names ``base`` (local paths compared once resolved)."""
    if not recorded:
        return False
    if recorded == base:
        return True
    return os.path.exists(recorded) and os.path.exists(base) and os.path.samefile(recorded, base)


def _adapter_mismatches(config: dict, peft_config, base: str) -> list[str]:
    problems = []
    if config.get("peft_type") != "BOFT":
        problems.append(f"a {config.get('peft_type')} adapter")
    elif not same_base(config.get("base_model_name_or_path"), base):
        problems.append(f"an adapter for base model {config.get('base_model_name_or_path')!r}, not {base!r}")
    else:
        for key in _GEOMETRY_KEYS:
            if config.get(key) != getattr(peft_config, key):
                problems.append(f"an adapter with {key}={config.get(key)} (this run: {getattr(peft_config, key)})")
    return problems


def check_output_dir(output_dir: str | os.PathLike, peft_config, base: str, overwrite: bool) -> None:
    """Raise :class:`RecipeError` (one line) when ``output_dir`` holds an adapter or model this run did not write."""
    if overwrite:
        return
    root = Path(output_dir)
    adapter_file = root / "adapter_config.json"
    problems: list[str] = []
    if adapter_file.is_file():
        try:
            config = json.loads(adapter_file.read_text())
        except (OSError, ValueError):
            config = None
        if not isinstance(config, dict):
            problems.append("an unreadable adapter_config.json")
        else:
            problems += _adapter_mismatches(config, peft_config, base)
    elif (root / "config.json").is_file() and any((root / name).exists() for name in _MODEL_WEIGHTS):
        problems.append("a model (config.json and weights)")
    if problems:
        raise RecipeError(
            f"output_dir {root} already holds {'; '.join(problems)}, which this run did not write; nothing was "
            "written. Choose another output_dir, or set overwrite_output_dir: true to replace those files"
        )
