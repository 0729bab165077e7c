"""Tiny models built from configs with random weights: no hub, no download.

Used by the tests, the examples, the benchmarks and the main job, so that they all exercise the same shapes.
"""

from __future__ import annotations

import torch


def tiny_llama_config(
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 256,
    max_position_embeddings: int = 256,
    **overrides,
):
    """A ``LlamaConfig`` small enough for CPU tests (defaults: ~100k parameters)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        **overrides,
    )


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    """A randomly initialised ``LlamaForCausalLM`` (deterministic for a given seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**config_overrides), dtype=dtype)
    return model.eval()
