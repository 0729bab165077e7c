"""The layer's side of DeepSpeed ZeRO-3: which adapter tensors a BOFT layer uses in every forward.

It lives in the tuner (not in ``distributed/``) because the hook must be installed when a layer is built; it imports
DeepSpeed only when DeepSpeed is already loaded, so the tuner keeps no dependency on it.

A BOFT layer reads ``boft_R`` / ``boft_s`` from ``ParameterDict`` children whose own ``forward`` never runs, so
ZeRO-3 learns which adapter tensors a layer uses only as they are read, and from its first step on it expects
every later pass to fetch the same ones. Switching adapters within a step (DPO's reference pass, several
adapters) then breaks its fetch trace ("tracing error ... expected the next parameters"). Registering every
adapter tensor of a layer as one of its external parameters, before DeepSpeed's own pre-forward hook runs, makes
the set the same in every pass (the extra, frozen adapters are small).
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["register_adapter_parameters", "zero3_pre_forward_hook"]


def _adapter_parameters(layer) -> list[nn.Parameter]:
    # dict.values on the raw storage: ZeRO-3's patched __getitem__ would gather each parameter
    return [p for holder in (layer.boft_R, layer.boft_s) for p in dict.values(holder._parameters) if p is not None]


def register_adapter_parameters(layer) -> int:
    """Register the layer's ZeRO-3-partitioned adapter tensors as its external parameters; return how many
    were newly registered (0 without DeepSpeed)."""
    if "deepspeed" not in sys.modules:
        return 0
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    known = getattr(layer, "_external_params", {})
    new = [p for p in _adapter_parameters(layer) if hasattr(p, "ds_id") and id(p) not in known]
    for param in new:
        register_external_parameter(layer, param)
    return len(new)


def zero3_pre_forward_hook(layer, args) -> None:
    """Forward pre-hook installed on every BOFT layer at construction, so it runs before DeepSpeed's."""
    if "deepspeed" in sys.modules:
        register_adapter_parameters(layer)
