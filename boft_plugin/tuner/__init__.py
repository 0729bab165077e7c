"""The PEFT-facing tuner: geometry and target checks, layers, the state-dict boundary, ``BoftTuner``, and the
registration that routes PEFT's ``BOFT`` type to it.

Imports only :mod:`boft_plugin.ops`, :mod:`boft_plugin.errors`, PEFT and torch (see docs/architecture.md).
"""

from ..errors import (
    BoftCheckpointError,
    BoftNumericsError,
    BoftSaveError,
    BoftTargetError,
    GeometryError,
    ShardingOrderError,
)
from .conv import BoftConv2d
from .geometry import Geometry, resolve_geometry
from .layer import BoftLayer
from .linear import BoftLinear
from .model import BoftTuner
from .targets import TargetPlan, check_targets, plan_targets

__all__ = [
    "BoftCheckpointError",
    "BoftConv2d",
    "BoftLayer",
    "BoftLinear",
    "BoftTuner",
    "BoftNumericsError",
    "BoftSaveError",
    "BoftTargetError",
    "Geometry",
    "GeometryError",
    "ShardingOrderError",
    "TargetPlan",
    "check_targets",
    "plan_targets",
    "resolve_geometry",
]
