"""Quantised tiny Llamas for tests: a random Llama saved once, loaded 4-bit or 8-bit through transformers.

Needs the ``quant`` extra (bitsandbytes); :func:`bitsandbytes_missing` says why a machine cannot run them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..toy.models import tiny_llama

__all__ = ["QUANT_MODES", "bitsandbytes_missing", "load_quantised", "save_tiny_llama"]

# The bitsandbytes layouts users load with transformers' BitsAndBytesConfig (TRL ModelConfig's keys in brackets).
QUANT_MODES: dict[str, dict] = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    # double quantisation, and a float storage dtype (what FSDP needs to shard 4-bit weights)
    "nf4-double-bf16": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_quant_storage": torch.bfloat16,
    },
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}


def bitsandbytes_missing() -> str | None:
    """Why quantised tests cannot run here (None: bitsandbytes is installed)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'boft-plugin[quant]')"
    return None


def save_tiny_llama(path: Path, seed: int = 0, **config_overrides) -> Path:
    """Save a random tiny Llama (float32 safetensors) to ``path``; quantised loads read it from there."""
    model = tiny_llama(seed=seed, **config_overrides)
    model.save_pretrained(path)
    return Path(path)


def load_quantised(path: Path, mode: str, dtype: torch.dtype = torch.float32):
    """The model saved at ``path`` loaded quantised as ``mode`` (a key of :data:`QUANT_MODES`), in eval mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(**QUANT_MODES[mode])
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype, device_map="cpu")
    return model.eval()
