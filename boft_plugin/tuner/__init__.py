"""The PEFT-facing tuner: geometry and target checks, layers, the state-dict boundary, and ``BoftModel``.

Imports only :mod:`boft_plugin.ops`, PEFT and torch (see docs/architecture.md).
"""

from .conv import BoftConv2d
from .errors import BoftCheckpointError, BoftNumericsError, BoftSaveError, BoftTargetError, ShardingOrderError
from .geometry import Geometry, GeometryError, resolve_geometry
from .layer import BoftLayer
from .linear import BoftLinear
from .model import BoftModel
from .targets import TargetPlan, check_targets, plan_targets

__all__ = [
    "BoftCheckpointError",
    "BoftConv2d",
    "BoftLayer",
    "BoftLinear",
    "BoftModel",
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
