"""``BoftTuner``: PEFT's BOFT tuner with our layers, registered in place of PEFT's by ``register()``.

It keeps PEFT's ``BOFTModel`` API (it subclasses it) and changes two things: every targeted module is checked
before the first one is replaced (one error lists them all), and modules are built from our fast layer classes.
"""

from __future__ import annotations

import warnings

from peft.tuners.boft.model import BOFTModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import BoftCheckpointError, ShardingOrderError
from .conv import BoftConv2d
from .layer import BoftLayer
from .linear import BoftLinear
from .numerics import track
from .quantised import keep_bnb_training_layout, quantisation_kwargs
from .state_dict import (
    check_adapter_tensors,
    expected_adapter_shapes,
    from_peft_layout,
    refuse_partitioned,
    selection_is_unchecked,
    to_peft_layout,
)
from .targets import check_targets, conv_differs_in_stock_peft, layer_kind, unsupported_reason


def is_fsdp2_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or one of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def undo_adapter(model: nn.Module, adapter_name: str) -> None:
    """Take an injected adapter out again: layers left without adapters give their base layer back, and the
    parameters' ``requires_grad`` flags are restored to what they were before the injection."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BoftLayer) and adapter_name in module.boft_R:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module.delete_adapter(adapter_name)
            if not module.boft_R:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    for owner in (model, getattr(model, "base_model", None)):
        configs = getattr(owner, "peft_config", None) if owner is not None else None
        if isinstance(configs, dict):
            configs.pop(adapter_name, None)
    tuner = model.base_model if isinstance(getattr(model, "base_model", None), BoftTuner) else model
    for param, flag in tuner.__dict__.get("_boft_requires_grad_before", {}).pop(adapter_name, []):
        param.requires_grad_(flag)


class BoftTuner(BOFTModel):
    """Drop-in replacement for PEFT's ``BOFTModel`` (same config, same parameter names and shapes)."""

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # PEFT's save_pretrained / get_peft_model_state_dict route through here. A gathering exporter selects
        # first and gathers afterwards (state_dict.unchecked_selection); every other save is checked.
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if selection_is_unchecked():
            return selected
        refuse_partitioned(selected)
        return to_peft_layout(model, selected)  # block-major (FSDP2) boft_R is written as PEFT's (m, N, b, b)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        self._adapter_being_injected = adapter_name
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            del self._adapter_being_injected

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        # PEFT calls this after resolving the config and before replacing any module.
        if is_fsdp2_sharded(model):
            raise ShardingOrderError(
                "cannot add a BOFT adapter to a model already sharded with FSDP2 (fully_shard): the new adapter "
                "parameters would not be managed by FSDP and would drift apart across ranks without any error. "
                "Add the adapter first, then shard with boft_plugin.distributed.fsdp2.shard_for_fsdp2(model)."
            )
        adapter_name = getattr(self, "_adapter_being_injected", "default")
        check_targets(model, peft_config, adapter_name=adapter_name)
        keep_bnb_training_layout(model)  # bitsandbytes' CPU eval layout breaks its 4-bit backward (quantised.py)
        # what to restore if loading this adapter's weights fails after injection (see undo_adapter)
        snapshots = self.__dict__.setdefault("_boft_requires_grad_before", {})
        snapshots[adapter_name] = [(p, p.requires_grad) for p in model.parameters()]
        track(self)  # checked for NaN/Inf after every optimizer step that updates its adapters

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # Every PEFT load path (from_pretrained, load_adapter, set_peft_model_state_dict) passes here before
        # copying tensors: check them all, and on a mismatch take the just-injected adapter out again.
        problems = check_adapter_tensors(state_dict, expected_adapter_shapes(model, adapter_name), config.to_dict())
        if problems:
            undo_adapter(model, adapter_name)
            raise BoftCheckpointError(
                f"the checkpoint for adapter '{adapter_name}' does not fit this model; the adapter was not added:\n  - "
                + "\n  - ".join(problems)
            )
        state_dict = from_peft_layout(model, adapter_name, state_dict)  # PEFT's layout on disk, maybe block-major here
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def _create_and_replace(self, boft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if isinstance(target, BoftLayer):
            target.update_layer(adapter_name, config=boft_config)
            return
        # torchao's requantisation settings, as PEFT passes them to its layers (quantised.py)
        new_module = self._create_new_module(boft_config, adapter_name, target, **quantisation_kwargs(self.model))
        new_module.boft_module_name = current_key  # for error messages
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an additional adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(boft_config, adapter_name: str, target: nn.Module, **kwargs) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        reason = unsupported_reason(base, kwargs)
        if reason:
            raise TypeError(f"Target module {target}: {reason}")
        kind = layer_kind(base)
        if kind == "conv2d":
            differs = conv_differs_in_stock_peft(base)
            if differs:
                warnings.warn(
                    f"a targeted Conv2d has {differs}: boft-plugin runs the layer's own "
                    "convolution, stock PEFT's BOFT uses padding[0]/stride[0] for both axes, no dilation and zero "
                    "padding: this adapter loads in stock PEFT but gives different outputs there",
                    stacklevel=2,
                )
            return BoftConv2d(target, adapter_name, config=boft_config, **kwargs)
        if kind == "linear" and boft_config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                "Setting fan_in_fan_out to False.",
                stacklevel=2,
            )
            boft_config.fan_in_fan_out = False
        elif kind == "conv1d" and not boft_config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
                stacklevel=2,
            )
            boft_config.fan_in_fan_out = True
        return BoftLinear(target, adapter_name, config=boft_config, **kwargs)


BoftModel = BoftTuner  # the name before 0.2 (it differed from PEFT's BOFTModel by case only); kept one release
