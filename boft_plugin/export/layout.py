"""The layout of a run's ``output_dir``: the names its writers (recipes, exports) and readers (verify) share.

output_dir/
    adapter_config.json, adapter_model.safetensors    the trained adapter (PEFT's layout)
    tokenizer files                                   the run's tokenizer
    single_factor/                                    the equivalent m = 1 adapter (export_single_factor)
    merged/                                           the merged plain model (export_merged)
    lora/                                             the adapter as a LoRA adapter, with its report (export_lora)
    probe_logits.pt                                   the trained model's logits on probe_text
    boft_run_summary.json                             losses, evaluations, memory, files written
    checkpoint-N/                                     the Trainer's checkpoints (save_steps)
    base_model/                                       a config-built base model (tiny_model / model_config)
"""

from __future__ import annotations

MERGED_DIR = "merged"
SINGLE_FACTOR_DIR = "single_factor"
LORA_DIR = "lora"
LORA_REPORT = "lora_conversion.json"
PROBE_FILE = "probe_logits.pt"
SUMMARY_FILE = "boft_run_summary.json"
BASE_MODEL_DIR = "base_model"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
# the files tokenizers' save_pretrained writes (any of them may be absent)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_PICKLE",
    "ADAPTER_WEIGHTS",
    "BASE_MODEL_DIR",
    "LORA_DIR",
    "LORA_REPORT",
    "MERGED_DIR",
    "PROBE_FILE",
    "SINGLE_FACTOR_DIR",
    "SUMMARY_FILE",
    "TOKENIZER_FILES",
]
