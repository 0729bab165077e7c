"""The PEFT-facing tuner: config checks, layers and the ``BoftModel`` that ``register()`` installs."""

from .conv import BoftConv2d
from .geometry import Geometry, GeometryError, resolve_geometry
from .linear import BoftLinear
from .model import BoftModel
from .targets import BoftTargetError, TargetPlan, check_targets, plan_targets

__all__ = [
    "BoftConv2d",
    "BoftLinear",
    "BoftModel",
    "BoftTargetError",
    "Geometry",
    "GeometryError",
    "check_targets",
    "TargetPlan",
    "plan_targets",
    "resolve_geometry",
]
