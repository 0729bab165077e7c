"""Which modules a BOFT config targets in a model, and whether each can take the adapter.

Pure planning: nothing here modifies the model. ``plan_targets`` is shared by the up-front config check (before
any module is replaced) and by the checkpoint checks (expected tensor shapes before anything is loaded).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from peft.tuners.boft.layer import BOFTLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import BoftTargetError
from ..runtime.upstream import in_out_features, include_all_linear_layers, is_excluded_match, target_module_matches
from .geometry import Geometry, GeometryError, resolve_geometry, scale_shape, suggest_valid_choices
from .layer import BoftLayer
from .quantised import quantisation_backend, quantisation_kwargs

try:  # transformers is optional for the tuner itself
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency of the package
    Conv1D = None


def _backend_or_none(module: nn.Module, **quant_kwargs):
    try:
        return quantisation_backend(module, **quant_kwargs)
    except ValueError:  # a torchao layer without its model's requantisation settings: refused in quantised_reason
        return None


def layer_kind(module: nn.Module) -> str | None:
    """``'linear'``, ``'conv1d'`` (transformers), ``'conv2d'``, or None for a type we do not adapt.

    bitsandbytes and torchao layers are ``nn.Linear``s; other quantised layers (HQQ, GPTQ, ...) take the kind
    their PEFT quantisation backend declares, as in stock PEFT's BOFT.
    """
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D is not None and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    backend = _backend_or_none(module)
    return getattr(backend, "layer_type", None) if backend is not None else None


def _quantised_in_out(module: nn.Module) -> tuple[int, int]:
    return in_out_features(module)


def rotated_width(module: nn.Module) -> int:
    """Width the rotation acts on for a supported base module (ZeRO-3-partitioned weights included)."""
    kind = layer_kind(module)
    if kind == "linear":
        return module.in_features if isinstance(module, nn.Linear) else _quantised_in_out(module)[0]
    if kind == "conv1d":
        shape = getattr(module.weight, "ds_shape", module.weight.shape)
        return int(shape[0])
    if kind == "conv2d":
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    raise TypeError(f"unsupported layer type {type(module).__name__}")


# Quantised layers no PEFT quantisation backend handles (a library PEFT does not know, or one not installed) are
# refused: by class name (their weight may not be packed yet when the adapter is added), otherwise by their weight.
QUANTISED_CLASS_NAMES = frozenset(
    {
        "Linear4bit",
        "Linear8bitLt",
        "LinearNF4",
        "LinearFP4",
        "Linear8bit",
        "QuantLinear",
        "WQLinear",
        "HQQLinear",
        "FP8Linear",
        "QLinear",
    }
)


def _declared_weight_shape(module: nn.Module, kind: str) -> tuple[int, ...]:
    if kind == "conv2d":
        return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    if kind == "conv1d":
        return (rotated_width(module), module.nf)
    return (module.out_features, module.in_features)


def quantised_reason(module: nn.Module, kind: str, quant_kwargs: dict | None = None) -> str | None:
    """Why ``module`` is a quantised layer BOFT cannot adapt (None: a plain layer, or one a PEFT backend handles).

    ``quant_kwargs``: what the model gives PEFT's backends (:func:`.quantised.quantisation_kwargs`).
    """
    name = f"{type(module).__module__}.{type(module).__name__}"
    try:
        if quantisation_backend(module, **(quant_kwargs or {})) is not None:
            return None  # PEFT's backend dequantises / re-quantises it (or runs it forward only), as stock BOFT
    except ValueError as err:
        return f"layer type {name} is quantised, but PEFT's quantisation backend cannot handle it here: {err}"
    for cls in type(module).__mro__:
        if cls.__module__.split(".")[0] == "bitsandbytes" or cls.__name__ in QUANTISED_CLASS_NAMES:
            return (
                f"layer type {name} is a quantised layer ({cls.__name__}) that none of PEFT's quantisation "
                "backends handles (is its library installed in a version PEFT supports?): load the model "
                "unquantised (or dequantize first), or quantise it with bitsandbytes, HQQ or torchao"
            )
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    shape = tuple(getattr(weight, "ds_shape", weight.shape))  # ZeRO-3 holds a [0] partition locally
    declared = _declared_weight_shape(module, kind)
    if not weight.is_floating_point() or shape != tuple(declared):
        return (
            f"layer {name} holds a weight of dtype {weight.dtype} and shape {shape}, not a floating-point tensor of "
            f"its declared shape {declared}: a quantised or packed weight; load the model unquantised or dequantize "
            "first"
        )
    return None


def unsupported_reason(module: nn.Module, quant_kwargs: dict | None = None) -> str | None:
    """Why BOFT cannot adapt ``module`` (None when it can); checked for every target before anything changes."""
    kind = layer_kind(module)
    if kind is None:
        return (
            f"layer type {type(module).__module__}.{type(module).__name__} is not supported "
            "(supported: torch.nn.Linear, transformers Conv1D, torch.nn.Conv2d with groups=1 and a square kernel)"
        )
    quantised = quantised_reason(module, kind, quant_kwargs)
    if quantised:
        return quantised
    if kind == "conv2d" and module.groups > 1:
        return f"Conv2d with groups={module.groups} is not supported (BOFT needs groups=1)"
    if kind == "conv2d" and module.kernel_size[0] != module.kernel_size[1]:
        return (
            f"Conv2d with the non-square kernel {tuple(module.kernel_size)} is not supported: PEFT's BOFT format sizes "
            "Conv2d adapters as in_channels * kernel_size[0]**2, so such an adapter could not move to stock PEFT "
            "(which builds a wrongly sized boft_R for it and fails at its first forward)"
        )
    return None


def conv_differs_in_stock_peft(module: nn.Module) -> str | None:
    """What stock PEFT 0.21.2 computes differently for this (supported) Conv2d, if anything.

    Its BOFT Conv2d re-runs the convolution with ``padding[0]`` / ``stride[0]`` for both axes, no dilation and zero
    padding; ours runs the base layer's own convolution. Adapters still load both ways, but stock PEFT's outputs
    differ for such layers (its behaviour, measured in docs/numerics.md).
    """
    differences = []
    if module.stride[0] != module.stride[1]:
        differences.append(f"stride {tuple(module.stride)}")
    if isinstance(module.padding, str) or module.padding[0] != module.padding[1]:
        differences.append(f"padding {module.padding!r}")
    if tuple(module.dilation) != (1, 1):
        differences.append(f"dilation {tuple(module.dilation)}")
    if module.padding_mode != "zeros":
        differences.append(f"padding_mode {module.padding_mode!r}")
    return ", ".join(differences) or None


@dataclass(frozen=True)
class TargetPlan:
    """What adapting one module means: its kind, geometry and the expected adapter tensor shapes."""

    kind: str
    geometry: Geometry
    out_features: int

    @property
    def scale_shape(self) -> tuple[int, int]:
        return scale_shape(self.kind, self.out_features)


def _out_features(module: nn.Module) -> int:
    kind = layer_kind(module)
    if kind == "conv1d":
        return int(getattr(module.weight, "ds_shape", module.weight.shape)[1])
    if kind == "conv2d":
        return module.out_channels
    return module.out_features if isinstance(module, nn.Linear) else _quantised_in_out(module)[1]


def resolve_target_modules(config, model: nn.Module):
    """A copy of ``config`` with ``target_modules`` resolved as PEFT resolves it when it adapts ``model``: PEFT's
    per-architecture default when unset, ``all-linear`` expanded. Raises :class:`BoftTargetError` when PEFT has no
    default for the model type."""
    config = copy.copy(config)
    if config.target_modules is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING as defaults

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        default = defaults.get(model_type)
        if default is None:
            raise BoftTargetError(f"PEFT has no default BOFT target modules for model type {model_type!r}; list them")
        config.target_modules = default if isinstance(default, str) else set(default)
    return include_all_linear_layers(config, model)


def is_targeted(config, key: str) -> bool:
    """Whether PEFT's own matcher adapts the module named ``key`` (targeted and not excluded)."""
    matched = target_module_matches(config, key)
    return bool(matched) and not is_excluded_match(matched)


def plan_targets(model: nn.Module, config) -> tuple[dict[str, TargetPlan], list[str]]:
    """Modules ``config`` targets in ``model`` (names relative to ``model``) and the problems found, if any.

    Works on a model on the meta device (no weights needed): the recipes check a config before loading anything.
    """
    config = resolve_target_modules(config, model)
    quant_kwargs = quantisation_kwargs(model)
    tuner_prefixes: list[str] = []
    problems: list[str] = []
    plans: dict[str, TargetPlan] = {}
    for key, module in model.named_modules():
        if not key or any(key.startswith(prefix) for prefix in tuner_prefixes):
            continue
        if isinstance(module, BaseTunerLayer):
            tuner_prefixes.append(key + ".")
        if not is_targeted(config, key):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(module, BOFTLayer) and not isinstance(module, BoftLayer):
            problems.append(
                f"{key}: holds a stock PEFT BOFT layer built before boft_plugin.register(); rebuild the model "
                "after register() to add adapters"
            )
            continue
        reason = unsupported_reason(base, quant_kwargs)
        if reason:
            problems.append(f"{key}: {reason}")
            continue
        width = rotated_width(base)
        try:
            geometry = resolve_geometry(
                width, config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor
            )
        except GeometryError as err:
            hint = suggest_valid_choices(
                width, config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor
            )
            problems.append(f"{key} (width {width}): {err.reason}; {hint}")
            continue
        plans[key] = TargetPlan(layer_kind(base), geometry, _out_features(base))
    return plans, problems


def check_targets(model: nn.Module, config, adapter_name: str) -> dict[str, TargetPlan]:
    """Check every module the config targets; raise one :class:`BoftTargetError` listing all problems.

    Runs before any module is replaced, so a bad config leaves the model untouched.
    """
    plans, problems = plan_targets(model, config)
    if problems:
        header = (
            f"BOFT adapter '{adapter_name}' (boft_block_size={config.boft_block_size}, "
            f"boft_block_num={config.boft_block_num}, boft_n_butterfly_factor={config.boft_n_butterfly_factor}) "
            f"cannot be applied to {len(problems)} module(s); the model was not modified:"
        )
        raise BoftTargetError("\n  - ".join([header, *problems]))
    return plans
