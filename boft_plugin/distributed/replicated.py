"""One process, and DDP: every rank holds the whole model; the Trainer (accelerate) places and wraps it."""

from __future__ import annotations

from .engine import Engine

__all__ = ["ReplicatedEngine"]


class ReplicatedEngine(Engine):
    """``single`` or ``ddp``: the interface's defaults (``from_pretrained``; TRL or PEFT adds the adapter)."""

    def __init__(self, name: str = "single"):
        self.name = name
