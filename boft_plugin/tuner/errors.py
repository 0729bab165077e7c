"""Every error the tuner raises for a user mistake or a broken state; each message names the layer or file at fault.

They live here (not next to the code that raises them) so that every layer above the tuner (export, adapter
loading, sharding, recipes) can catch them without importing the tuner's internals.
"""

from __future__ import annotations

__all__ = [
    "BoftCheckpointError",
    "BoftNumericsError",
    "BoftSaveError",
    "BoftTargetError",
    "ShardingOrderError",
]


class BoftTargetError(ValueError):
    """One or more targeted modules cannot take the requested BOFT adapter; nothing was modified."""


class BoftCheckpointError(ValueError):
    """An adapter checkpoint cannot be loaded as it is; nothing was loaded or changed."""


class BoftSaveError(RuntimeError):
    """A save would write partitioned (sharded) adapter tensors; nothing was written."""


class BoftNumericsError(FloatingPointError):
    """An adapter's rotation or scale is NaN/Inf; raised instead of letting it spread through the model silently."""


class ShardingOrderError(RuntimeError):
    """Sharding and adapter creation happened in an order that would train wrong; nothing was changed."""
