"""Gathered exports from any layout: PEFT adapters (export_adapter) and merged models (export_merged)."""

from .adapter import export_adapter
from .merged import export_merged

__all__ = ["export_adapter", "export_merged"]
