"""What the end-of-run ``push_to_hub`` uploads: the adapter and the tokenizer unless the recipe asks for more.

A run's ``output_dir`` also holds checkpoints, a merged model, a config-built ``base_model/``, probe logits and a
summary with this machine's absolute paths: none of that is uploaded unless ``hub_upload`` names it. The Trainer's
model card (``README.md``) always goes. Checkpoint uploads during training are the Trainer's, as ``hub_strategy``
says.
"""

from __future__ import annotations

from ..export.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA_DIR,
    MERGED_DIR,
    PROBE_FILE,
    SINGLE_FACTOR_DIR,
    SUMMARY_FILE,
    TOKENIZER_FILES,
)

__all__ = ["HUB_PATTERNS", "hub_patterns"]

HUB_PATTERNS = {
    "adapter": [ADAPTER_CONFIG, ADAPTER_WEIGHTS],
    "tokenizer": list(TOKENIZER_FILES),
    "single_factor": [f"{SINGLE_FACTOR_DIR}/*"],
    "merged": [f"{MERGED_DIR}/*"],
    "lora": [f"{LORA_DIR}/*"],
    "probe": [PROBE_FILE],
    "summary": [SUMMARY_FILE],
}


def hub_patterns(parts: list[str]) -> list[str]:
    """``allow_patterns`` for ``huggingface_hub.upload_folder`` covering ``parts`` (and the model card)."""
    patterns = ["README.md"]
    for part in parts:
        patterns += HUB_PATTERNS[part]
    return patterns
