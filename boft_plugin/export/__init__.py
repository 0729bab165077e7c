"""Gathered exports from any layout: PEFT adapters (export_adapter), merged models (export_merged) and LoRA adapters
for LoRA-only servers (export_lora, convert_to_lora)."""

from .adapter import export_adapter
from .lora import export_lora
from .lora_convert import convert_to_lora
from .merged import export_merged

__all__ = ["convert_to_lora", "export_adapter", "export_lora", "export_merged"]
