"""The whole-model effect of a LoRA conversion: the LoRA model against the BOFT model on a probe, in one process.

The BOFT model is boft-plugin's reload of the adapter; the LoRA model is *stock* PEFT's ``PeftModel.from_pretrained``
of the converted directory on the same base weights (what a server loads). Both run in float32; the figures are
float64: the largest logit difference relative to the largest logit (``ops.compare.max_relative_error``) and the
per-token ``KL(p_BOFT || p_LoRA)``, beside ``KL(p_BOFT || p_base)`` (how far the adapter moves the base at all) for
scale. This step holds the whole model in this process, as ``boft-plugin verify`` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..errors import LoraConversionError
from ..ops.compare import max_relative_error
from .layout import PROBE_FILE

__all__ = ["kl_per_token", "probe_conversion"]

OWN_PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789"


def kl_per_token(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(softmax(p) || softmax(q))`` per position in float64; ``(..., vocab)`` -> ``(...)``."""
    log_p = torch.log_softmax(logits_p.double(), dim=-1)
    log_q = torch.log_softmax(logits_q.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)


def _input_ids(boft_dir: Path, base_path: str, prompt_file: str | os.PathLike | None) -> tuple[Tensor, str]:
    probe_file = boft_dir / PROBE_FILE
    if prompt_file is None and probe_file.is_file():
        return torch.load(probe_file, weights_only=True)["input_ids"], f"{PROBE_FILE} (the training run's probe)"
    from transformers import AutoTokenizer

    tokenizer_source = boft_dir if (boft_dir / "tokenizer_config.json").is_file() else Path(base_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    except (OSError, ValueError) as err:
        message = f"no tokenizer for the probe in {boft_dir} or {base_path} ({err}); pass --no-probe"
        raise LoraConversionError(message) from None
    if prompt_file is not None:
        text, where = Path(prompt_file).read_text(), str(prompt_file)
    else:
        text, where = OWN_PROBE_TEXT, "a fixed sentence (no probe_logits.pt, no prompt file)"
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise LoraConversionError(f"{where}: the prompt has no tokens")
    return ids, where


def probe_conversion(
    boft_dir: str | os.PathLike, lora_dir: str | os.PathLike, base_path: str, prompt_file=None
) -> dict:
    """Logit error and KL of stock PEFT's LoRA model on ``lora_dir`` vs boft-plugin's BOFT model on ``boft_dir``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..tuner.registry import is_registered, unregister
    from .loading import load_adapter

    boft_dir = Path(boft_dir)
    input_ids, where = _input_ids(boft_dir, base_path, prompt_file)
    was_registered = is_registered()
    try:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        with torch.no_grad():
            base_logits = base(input_ids=input_ids).logits
            boft = load_adapter(base, boft_dir).eval()
            boft_logits = boft(input_ids=input_ids).logits
            base = boft.unload()
            lora = PeftModel.from_pretrained(base, str(lora_dir)).eval()
            lora_logits = lora(input_ids=input_ids).logits
    finally:
        if not was_registered:
            unregister()
    kl = kl_per_token(boft_logits, lora_logits)
    adapter_kl = kl_per_token(boft_logits, base_logits)
    return {
        "input": where,
        "tokens": int(input_ids.numel()),
        "logit_rel_err": max_relative_error(lora_logits, boft_logits),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "adapter_kl_mean": float(adapter_kl.mean()),
        "adapter_logit_rel_change": max_relative_error(base_logits, boft_logits),
    }
