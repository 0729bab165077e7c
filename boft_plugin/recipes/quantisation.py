"""A recipe's quantised base model: TRL ``ModelConfig``'s bitsandbytes keys, checked before any weights load.

The keys and their meaning are TRL's (``trl sft --load_in_4bit ...``, ``trl.get_quantization_config``):
``load_in_4bit`` / ``load_in_8bit``, ``bnb_4bit_quant_type`` (``nf4`` / ``fp4``), ``use_bnb_nested_quant`` (double
quantisation), ``bnb_4bit_quant_storage`` (the dtype the packed 4-bit codes are stored as), and ``dtype`` as the 4-bit
compute dtype. The base layers stay quantised while the BOFT adapters train in float32; the merged export is written
at full precision from the base checkpoint (docs/quantised.md).
"""

from __future__ import annotations

import importlib.util

from ..errors import RecipeError

__all__ = ["QUANTISED_ENGINES", "check_quantisation", "describe_quantisation", "quantisation_config"]

# Engines a quantised base is tested under. ZeRO and FSDP2 shard the base weights, and neither path is tested yet
# with packed 4-bit / 8-bit weights: refused up front rather than failing (or replicating) half-way.
QUANTISED_ENGINES = ("single", "ddp")

_FOUR_BIT_KEYS = ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")


def _is_quantised(model_args) -> bool:
    return bool(model_args.load_in_4bit or model_args.load_in_8bit)


def quantisation_config(model_args):
    """transformers' ``BitsAndBytesConfig`` for a recipe's ``ModelConfig`` (None when it loads unquantised).

    As TRL's ``get_quantization_config``, except that ``dtype: auto`` leaves the 4-bit compute dtype to transformers
    (TRL passes "auto" on, which ``BitsAndBytesConfig`` cannot read).
    """
    if not _is_quantised(model_args):
        return None
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = model_args.dtype if model_args.dtype not in (None, "auto") else None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
    )


def describe_quantisation(config) -> str:
    """``'4-bit nf4, double quantisation, storage bfloat16'`` / ``'8-bit'`` for logs and summaries."""
    if config is None:
        return "none"
    if config.load_in_8bit:
        return "8-bit"
    parts = [f"4-bit {config.bnb_4bit_quant_type}"]
    if config.bnb_4bit_use_double_quant:
        parts.append("double quantisation")
    parts.append(f"storage {str(config.bnb_4bit_quant_storage).removeprefix('torch.')}")
    return ", ".join(parts)


def check_quantisation(model_args, engine: str) -> None:
    """Raise :class:`RecipeError` for quantisation keys that cannot run as given (nothing is loaded yet)."""
    from trl import ModelConfig

    if not _is_quantised(model_args):
        defaults = ModelConfig()
        unused = [key for key in _FOUR_BIT_KEYS if getattr(model_args, key) != getattr(defaults, key)]
        if unused:
            raise RecipeError(
                f"recipe key(s) {', '.join(repr(k) for k in unused)} only apply to a 4-bit base: add "
                "'load_in_4bit: true', or remove them"
            )
        return
    key = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
    if model_args.load_in_8bit:
        unused = [k for k in _FOUR_BIT_KEYS if getattr(model_args, k) != getattr(ModelConfig(), k)]
        if unused:
            raise RecipeError(f"recipe key(s) {', '.join(repr(k) for k in unused)} apply to 4-bit bases, not 8-bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(
            f"recipe key '{key}' needs bitsandbytes, which is not installed: pip install 'boft-plugin[quant]'"
        )
    if engine not in QUANTISED_ENGINES:
        raise RecipeError(
            f"recipe key '{key}': a quantised base runs in one process or under DDP ({', '.join(QUANTISED_ENGINES)}); "
            f"this launch is {engine}, where sharding packed 4-bit / 8-bit weights is not supported yet. Launch with "
            "torchrun or accelerate's multi_gpu config, or load the base unquantised"
        )
    try:
        quantisation_config(model_args)
    except (TypeError, ValueError, AttributeError) as err:
        raise RecipeError(f"recipe quantisation keys cannot be used: {err}") from err
