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

__all__ = [
    "QUANTISED_ENGINES",
    "check_packed_codes_survive_half_mode",
    "check_quantisation",
    "describe_quantisation",
    "quantisation_config",
]

# Engines a quantised base runs under (docs/quantised.md says which combination is tested and which was probed).
# ZeRO-3 partitions the quantised weights as the engine starts; FSDP2 (``fsdp2_pre_shard``) shards 4-bit codes
# stored in a float dtype (``bnb_4bit_quant_storage``).
# accelerate's FSDP plugin and 8-bit weights under FSDP2 are not tested with packed weights: refused up front rather
# than failing (or replicating) half-way.
QUANTISED_ENGINES = ("single", "ddp", "zero2", "zero3", "fsdp2")
_FLOAT_STORAGE = ("bfloat16", "float16", "float32")

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


def _storage_dtype(model_args) -> str:
    """The packed 4-bit codes' storage dtype as a name (bitsandbytes' default: uint8)."""
    return str(model_args.bnb_4bit_quant_storage or "uint8").removeprefix("torch.")


def check_packed_codes_survive_half_mode(model_args, half_dtype: str | None) -> None:
    """Refuse a 4-bit base whose packed codes DeepSpeed's own half-precision mode would cast (``half_dtype``:
    ``deepspeed_precision.deepspeed_half_mode``): it casts every float parameter, and a float32 (say) storage dtype
    holds bit patterns, not numbers, so the cast destroys the weights without an error."""
    if half_dtype is None or not model_args.load_in_4bit:
        return
    storage = _storage_dtype(model_args)
    if storage in _FLOAT_STORAGE and storage != half_dtype:
        raise RecipeError(
            f"recipe key 'bnb_4bit_quant_storage': {storage!r} packed 4-bit codes would be cast to {half_dtype} by "
            f"DeepSpeed's own half-precision mode (the DeepSpeed config enables it), which destroys them; set it to "
            f"{half_dtype!r} or 'uint8', or leave the config's precision 'auto' (bf16: true then runs torch_autocast)"
        )


def check_quantisation(model_args, engine: str, fsdp2_pre_shard: bool = False) -> None:
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
    if engine not in QUANTISED_ENGINES or (engine == "fsdp2" and not fsdp2_pre_shard):
        launch = "accelerate's FSDP plugin" if engine == "fsdp2" else engine
        raise RecipeError(
            f"recipe key '{key}': a quantised base runs in one process, under DDP, DeepSpeed ZeRO-2/3, or (4-bit) "
            f"under FSDP2 with 'fsdp2_pre_shard: true'; this launch is {launch}, where sharding packed 4-bit / 8-bit "
            "weights is not supported yet. Launch with torchrun and 'fsdp2_pre_shard: true', or with DeepSpeed"
        )
    if engine == "fsdp2":
        if model_args.load_in_8bit:
            raise RecipeError(
                "recipe key 'load_in_8bit': FSDP2 shards 4-bit bases only (8-bit weights carry their scales on the "
                "parameter, which FSDP2's sharded copy drops); use 'load_in_4bit: true', or launch under DDP"
            )
        storage = _storage_dtype(model_args)
        if storage not in _FLOAT_STORAGE:
            raise RecipeError(
                f"recipe key 'bnb_4bit_quant_storage': {storage!r} codes are not sharded by FSDP2 here; set it to "
                f"one of {', '.join(_FLOAT_STORAGE)} (the packed codes' storage dtype, e.g. your model's dtype)"
            )
    try:
        quantisation_config(model_args)
    except (TypeError, ValueError, AttributeError) as err:
        raise RecipeError(f"recipe quantisation keys cannot be used: {err}") from err
