"""Every error boft-plugin raises for a user mistake or a broken state, under one base: ``except BoftError``.

Each class also keeps the builtin base a caller would catch without knowing boft-plugin (``ValueError`` for bad
input, ``RuntimeError`` for a broken state, ``FloatingPointError`` for diverged numerics), so code written against
the builtin types keeps working. Every message names the layer, file or key at fault and what would be valid.
"""

from __future__ import annotations

__all__ = [
    "BoftCheckpointError",
    "BoftError",
    "BoftExportError",
    "BoftNumericsError",
    "BoftQuantisedMergeError",
    "BoftSaveError",
    "BoftTargetError",
    "GeometryError",
    "LoraBudgetError",
    "LoraConversionError",
    "RecipeError",
    "RunLockError",
    "ShardingOrderError",
    "SingleFactorError",
    "VerifyError",
]


class BoftError(Exception):
    """Base of every boft-plugin error."""


class GeometryError(BoftError, ValueError):
    """A block geometry that cannot work for a layer width; ``reason`` says why in one sentence."""

    def __init__(self, reason: str, key: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.key = key  # the config key at fault, when one alone is


class SingleFactorError(BoftError, ValueError):
    """An adapter cannot be written in single-factor form within tolerance; nothing was written."""


class BoftTargetError(BoftError, ValueError):
    """One or more targeted modules cannot take the requested BOFT adapter; nothing was modified."""


class BoftCheckpointError(BoftError, ValueError):
    """An adapter checkpoint cannot be loaded as it is; nothing was loaded or changed."""


class BoftSaveError(BoftError, RuntimeError):
    """A save would write partitioned (sharded) adapter tensors; nothing was written."""


class BoftExportError(BoftError, RuntimeError):
    """An export failed on some rank; every rank raises it (the message says which rank and why)."""


class BoftNumericsError(BoftError, FloatingPointError):
    """An adapter's rotation or scale is NaN/Inf; raised instead of letting it spread through the model silently."""


class BoftQuantisedMergeError(BoftError, TypeError):
    """A merge was asked of a quantised layer whose backend cannot dequantise (GPTQ, AWQ, ...); nothing changed."""


class ShardingOrderError(BoftError, RuntimeError):
    """Sharding and adapter creation happened in an order that would train wrong; nothing was changed."""


class RecipeError(BoftError, ValueError):
    """A recipe (YAML + command-line flags) that cannot run; the message names the key, file or column at fault.

    Raised before any model weights are loaded and before any training step.
    """


class RunLockError(RecipeError):
    """Another run holds the output directory's run lock; nothing was written."""


class VerifyError(BoftError, RuntimeError):
    """A run directory cannot be verified as it is (missing file or base model); the message is one line."""


class LoraConversionError(BoftError, ValueError):
    """A BOFT adapter cannot be converted to LoRA as asked (options, source, base weights); nothing was written."""


class LoraBudgetError(LoraConversionError):
    """No allowed rank meets the error budget for some layers; nothing was written. ``report`` holds every layer's
    figures (``report.failing``: the layers over budget)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
