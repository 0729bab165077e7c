"""A recipe's ``bf16: true`` under DeepSpeed, computed with DeepSpeed's ``torch_autocast`` (float32 adapters).

DeepSpeed's own ``bf16`` mode casts the whole module, adapters included, to bfloat16: the forward then sees bf16
``boft_R`` / ``boft_s`` (``bf16(1 + 3.9e-3) == 1``: the output scale stands still for many steps while the float32
master moves), and ZeRO-3 Trainer checkpoints hold bf16-rounded adapters. ``torch_autocast`` (DeepSpeed 0.19)
keeps every parameter float32, runs the forward under ``torch.autocast(bfloat16)`` (the base's linears compute in
bf16 and are communicated in bf16), and the adapter's maths stays float32 (docs/numerics.md, "Engines and bf16").

So when DeepSpeed runs a recipe that asks for bf16 and the DeepSpeed config leaves its precision to the Trainer
(``"bf16": {"enabled": "auto"}``, as the configs in ``integrations/deepspeed/`` do), the config handed to the Trainer
is that file with ``torch_autocast`` instead, and the Trainer's own ``bf16`` is off (DeepSpeed does the casting).
A config that sets ``bf16.enabled: true`` itself, or its own ``torch_autocast``, is used as written. fp16 is left to
DeepSpeed's fp16 mode (its autocast has no loss scaler under ZeRO). Works on the CPU too, where transformers refuses
``bf16`` with DeepSpeed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from typing import Any

from ..errors import RecipeError

__all__ = ["check_half_precision_has_a_gpu", "deepspeed_half_mode", "deepspeed_requested", "use_torch_autocast"]

_TRUE = {"true", "1", "yes"}


def _flag(args: Sequence[str], key: str) -> tuple[int, bool] | None:
    """``(index, value)`` of ``--key`` / ``--key=value`` / ``--key value`` on the command line, or None."""
    for index, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag.lstrip("-").replace("-", "_") != key or not arg.startswith("--"):
            continue
        if eq:
            return index, value.lower() in _TRUE
        following = args[index + 1] if index + 1 < len(args) else None
        if following is not None and not following.startswith("--"):
            return index, following.lower() in _TRUE
        return index, True
    return None


_ACCELERATE_CONFIG = "ACCELERATE_DEEPSPEED_CONFIG_FILE"


def _deepspeed_config(merged: dict, args: Sequence[str]) -> tuple[dict | None, str | None]:
    """The DeepSpeed config the Trainer would use (as a dict) and where it came from."""
    given = _flag_value(args, "deepspeed")
    source = given if given is not None else merged.get("deepspeed")
    if source is None:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            return None, None
        source = os.environ.get(_ACCELERATE_CONFIG)
        if source in (None, "", "none"):
            return None, None
    if isinstance(source, dict):
        return dict(source), "the recipe's deepspeed mapping"
    text = str(source)
    try:
        if os.path.isfile(text):
            with open(text, encoding="utf-8") as handle:
                return json.load(handle), text
        return json.loads(text), "the deepspeed key"
    except (OSError, ValueError) as err:
        raise RecipeError(f"recipe key 'deepspeed': cannot read the DeepSpeed config {text!r}: {err}") from None


def _flag_value(args: Sequence[str], key: str) -> str | None:
    for index, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if arg.startswith("--") and flag.lstrip("-").replace("-", "_") == key:
            return value if eq else (args[index + 1] if index + 1 < len(args) else None)
    return None


def _without_flag(args: list[str], key: str) -> None:
    found = _flag(args, key)
    if found is None:
        return
    index, _ = found
    has_value = "=" not in args[index] and index + 1 < len(args) and not args[index + 1].startswith("--")
    del args[index : index + (2 if has_value else 1)]


def deepspeed_requested(merged: dict, args: Sequence[str]) -> bool:
    """DeepSpeed runs this recipe: ``accelerate launch`` with a DeepSpeed config, or the ``deepspeed`` key/flag."""
    accelerate_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return accelerate_deepspeed or "deepspeed" in merged or _flag(args, "deepspeed") is not None


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _wants_bf16(merged: dict, args: Sequence[str], has_accelerator: bool) -> bool:
    flag = _flag(args, "bf16")
    if flag is not None:
        return flag[1]
    value = merged.get("bf16")
    if value is None:  # TRL's default: bf16 unless fp16 is asked for (refused without an accelerator)
        fp16 = _flag(args, "fp16")
        return has_accelerator and not (fp16[1] if fp16 else bool(merged.get("fp16")))
    return str(value).lower() in _TRUE if isinstance(value, str) else bool(value)


def use_torch_autocast(merged: dict[str, Any], args: list[str], has_accelerator: bool) -> str | None:
    """Rewrite ``merged`` / ``args`` in place as the module docstring says; returns a line for the log, or None
    when nothing changed (no DeepSpeed, no bf16, or a config that decides its precision itself)."""
    config, source = _deepspeed_config(merged, args)
    if config is None or not _wants_bf16(merged, args, has_accelerator):
        return None
    if "torch_autocast" in config:
        return None
    for section in ("bf16", "fp16"):
        enabled = (config.get(section) or {}).get("enabled", "auto")
        if enabled is True or str(enabled).lower() == "true":
            return None  # the config asks for DeepSpeed's own half-precision mode: used as written
    config["bf16"] = {"enabled": False}
    config["fp16"] = {"enabled": False}
    config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    config.pop("_comment", None)
    _without_flag(args, "bf16")
    merged["bf16"] = False
    if _flag_value(args, "deepspeed") is None and merged.get("deepspeed") is None:
        # accelerate's route (its DeepSpeed plugin reads the file named in the environment, and sets up the process
        # group as configured): a private copy of the rewritten file, named there
        import atexit
        import tempfile

        handle, path = tempfile.mkstemp(prefix="boft-deepspeed-", suffix=".json")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(config, out)
        atexit.register(_remove, path)
        os.environ[_ACCELERATE_CONFIG] = path
    else:
        _without_flag(args, "deepspeed")
        merged["deepspeed"] = config
    return (
        f"bf16 under DeepSpeed: {source} run with torch_autocast(bfloat16) instead of DeepSpeed's bf16 mode, so the "
        "BOFT adapters and every checkpoint stay float32 (boft_plugin.recipes.deepspeed_precision)"
    )


def deepspeed_half_mode(merged: dict[str, Any], args: Sequence[str], has_accelerator: bool) -> str | None:
    """``'bfloat16'`` / ``'float16'`` when DeepSpeed will run its own half-precision mode (which casts every float
    parameter to that dtype), else None; call after :func:`use_torch_autocast`.

    On when the config enables it, or leaves it ``auto`` and the recipe asks for that precision (transformers fills
    ``auto`` from the Trainer's ``bf16`` / ``fp16``); a missing section is off (DeepSpeed's default)."""
    config, _ = _deepspeed_config(merged, args)
    if config is None:
        return None
    fp16 = _flag(args, "fp16")
    wanted = {"bf16": _wants_bf16(merged, args, has_accelerator), "fp16": fp16[1] if fp16 else bool(merged.get("fp16"))}
    for section, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        enabled = str((config.get(section) or {}).get("enabled", False)).lower()
        if enabled == "true" or (enabled == "auto" and wanted[section]):
            return dtype
    return None


def check_half_precision_has_a_gpu(merged: dict[str, Any], args: Sequence[str], has_accelerator: bool) -> None:
    """Refuse, in one line and before transformers does (in words that name no remedy here), DeepSpeed's own
    half-precision modes on a machine without an accelerator; call after :func:`use_torch_autocast`."""
    if has_accelerator or not deepspeed_requested(merged, args):
        return
    fp16 = _flag(args, "fp16")
    if _wants_bf16(merged, args, has_accelerator) or (fp16[1] if fp16 else bool(merged.get("fp16"))):
        raise RecipeError(
            "DeepSpeed's own half-precision mode (a DeepSpeed config that enables bf16/fp16 itself, or recipe key "
            "'fp16'): transformers 5.24 refuses it on a machine without GPUs (its remedy, use_cpu, turns DeepSpeed "
            "off); use bf16: true with a config that leaves precision to the Trainer ('auto', as in "
            "integrations/deepspeed/), which runs DeepSpeed's torch_autocast, or fp16/bf16 with DDP or FSDP2"
        )
