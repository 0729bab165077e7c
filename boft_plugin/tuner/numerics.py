"""The numerics guard: non-finite adapters found once per optimizer step, on the device, named by layer.

The forward and backward of a BOFT layer read no value on the host (a host read stops a GPU's queue: ~3 per
layer and step before this guard existed). Instead, after each optimizer step, :func:`check_numerics` looks at
every adapter tensor of a model at once:

* one fused reduction (``torch._foreach_norm(..., inf)``: the largest ``|value|`` of each ``boft_R`` / ``boft_s``,
  NaN or Inf iff the tensor holds one) and one for ``max 1 / |boft_s|`` (is some ``|s| < SMALL_SCALE``);
* under a sharded engine each rank reduces its own shard and one ``all_reduce(MAX)`` of the flags makes every rank
  reach the same verdict (no rank raises alone and leaves the others waiting in a collective);
* one host read of the flags. A non-finite tensor raises :class:`BoftNumericsError` naming the layers; the
  small-scale flags become each layer's *scale hint*, which lets the next forward keep no extra activation for
  ``d boft_s`` (:func:`boft_plugin.ops.scale_shift.scale_shift`, ``save_output``).

Who calls it: ``register()`` installs a global optimizer step hook that checks every live BOFT model whose
trainable adapter parameters the stepping optimizer holds (any plain PyTorch, accelerate or Trainer loop);
:class:`boft_plugin.recipes.callbacks.NumericsGuardCallback` checks after every Trainer step where that hook does
not see the module's parameters (DeepSpeed steps its own flat partitions). ``BOFT_PLUGIN_NUMERICS_GUARD=0``
turns both off. A layer without a hint (before the first check, or after its ``boft_s`` was changed in place)
keeps ``r`` and stays exact.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import BoftNumericsError
from ..ops.scale_shift import SMALL_SCALE
from ..runtime.upstream import foreach_abs_reciprocal, foreach_max_abs

__all__ = [
    "check_numerics",
    "checked_since_last_step",
    "guard_enabled",
    "install_optimizer_guard",
    "remove_optimizer_guard",
    "track",
]


def guard_enabled() -> bool:
    """False when ``BOFT_PLUGIN_NUMERICS_GUARD=0`` (for a measurement without it; not recommended in training)."""
    return os.environ.get("BOFT_PLUGIN_NUMERICS_GUARD", "1") != "0"


@dataclass(frozen=True)
class _Tensor:
    layer_name: str
    layer: nn.Module
    adapter: str
    kind: str  # "boft_R" | "boft_s"
    local: Tensor  # this rank's values (its shard under ZeRO-3 / FSDP2), detached
    sharded: bool


def _local_values(param: Tensor) -> tuple[Tensor, bool]:
    """This rank's values of a parameter: the FSDP2 shard, the ZeRO-3 partition (padding cut off), or the whole."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.to_local().detach().reshape(-1), True
    if hasattr(param, "ds_tensor"):  # ZeRO-3: a flat partition per rank, zero padded at the end
        part = param.ds_tensor.numel()
        rank = dist.get_rank() if dist.is_initialized() else 0
        start = min(rank * part, param.ds_numel)
        return param.ds_tensor.detach().reshape(-1)[: min(part, param.ds_numel - start)], True
    return param.detach().reshape(-1), False


def _adapter_tensors(model: nn.Module) -> list[_Tensor]:
    from .layer import BoftLayer

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, BoftLayer):
            continue
        for kind in ("boft_R", "boft_s"):
            for adapter, param in getattr(module, kind).items():
                local, sharded = _local_values(param)
                layer_name = getattr(module, "boft_module_name", name)  # PEFT's key, whatever wraps the model
                found.append(_Tensor(layer_name, module, adapter, kind, local, sharded))
    return found


def _max_abs(tensors: list[Tensor]) -> list[Tensor]:
    """``max |t|`` per tensor (0 for an empty shard), NaN/Inf iff ``t`` holds one; fused per device and dtype."""
    out: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            out[i] = torch.zeros((), device=t.device)
        else:
            groups.setdefault((t.device, t.dtype), []).append(i)
    for indices in groups.values():
        for i, norm in zip(indices, foreach_max_abs([tensors[i] for i in indices]), strict=True):
            out[i] = norm
    return out  # type: ignore[return-value]


def _flags(entries: list[_Tensor]) -> tuple[list[bool], list[bool]]:
    """(non-finite per tensor, some |s| < SMALL_SCALE per ``boft_s``) with one host read, agreed across ranks."""
    device = entries[0].local.device
    scales = [t.local for t in entries if t.kind == "boft_s"]
    # max 1/|s| > 1/SMALL_SCALE iff some |s| < SMALL_SCALE (s = 0 gives Inf: small, not a NaN of the adapter)
    norms = _max_abs([t.local for t in entries]) + _max_abs(foreach_abs_reciprocal(scales))
    norms = torch.stack([n.to(device, torch.float32) for n in norms])
    n = len(entries)
    flags = torch.cat([~norms[:n].isfinite(), norms[n:] > 1 / SMALL_SCALE]).to(torch.int32)
    sharded = any(t.sharded for t in entries)
    if sharded and dist.is_initialized() and dist.get_world_size() > 1:
        if flags.device.type == "cpu" and "gloo" not in dist.get_backend():  # e.g. ZeRO-3 offload under NCCL
            flags = flags.to(torch.accelerator.current_accelerator(), torch.accelerator.current_device_index())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # a NaN in one rank's shard stops every rank
    values = flags.tolist()  # the guard's one host read
    return [bool(v) for v in values[:n]], [bool(v) for v in values[n:]]


def check_numerics(model: nn.Module) -> None:
    """Raise :class:`BoftNumericsError` if any adapter tensor of ``model`` holds NaN/Inf; refresh the scale hints.

    Collective under a sharded engine (every rank must call it, as after an optimizer step); one host read.
    """
    entries = _adapter_tensors(model)
    if not entries:
        return
    non_finite, small = _flags(entries)
    for entry, is_small in zip([t for t in entries if t.kind == "boft_s"], small, strict=True):
        entry.layer.set_scale_hint(entry.adapter, not is_small)
    broken = [entry for entry, bad in zip(entries, non_finite, strict=True) if bad]
    if broken:
        raise BoftNumericsError(_message(broken))


def _message(broken: list[_Tensor]) -> str:
    by_layer: dict[tuple[str, str], list[str]] = {}
    for entry in broken:
        count = int((~torch.isfinite(entry.local)).sum())  # the failure path: exact counts are worth a read
        if count:
            shard = " in this rank's shard" if entry.sharded else ""
            what = f"{entry.kind} has {count} NaN/Inf value(s) of {entry.local.numel()}{shard}"
        else:
            what = f"{entry.kind} has NaN/Inf values in another rank's shard"
        by_layer.setdefault((entry.layer_name, entry.adapter), []).append(what)
    lines = [f"layer {layer}, adapter '{adapter}': {', '.join(what)}" for (layer, adapter), what in by_layer.items()]
    more = f"\n  - ... and {len(lines) - 8} more layer(s)" if len(lines) > 8 else ""
    return (
        f"BOFT adapters of {len(lines)} layer(s) are not finite; the step that produced them diverged. Lower the "
        "learning rate or resume from the last good checkpoint:\n  - " + "\n  - ".join(lines[:8]) + more
    )


# -- the optimizer step hook installed by register() -----------------------------------------------------------

_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_hook_handle = None


def track(model: nn.Module) -> None:
    """Watch ``model`` (a tuner that holds BOFT layers) from the optimizer step hook (installed on first use)."""
    install_optimizer_guard()
    _models.add(model)


def _trainable_adapter_param(model: nn.Module) -> Tensor | None:
    from .layer import BoftLayer

    for module in model.modules():
        if isinstance(module, BoftLayer):
            for param in module.boft_R.values():
                if param.requires_grad:
                    return param
    return None


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not guard_enabled() or not _models:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in list(_models):
        param = _trainable_adapter_param(model)
        if param is not None and id(param) in held:
            model._boft_checked_by_hook = True  # the Trainer callback need not check this step again
            check_numerics(model)


def checked_since_last_step(model: nn.Module) -> bool:
    """Whether the optimizer hook checked the tuners inside ``model`` since the last call (clears the mark)."""
    tuners = [m for m in model.modules() if m in _models]
    checked = bool(tuners) and all(getattr(t, "_boft_checked_by_hook", False) for t in tuners)
    for tuner in tuners:
        tuner._boft_checked_by_hook = False
    return checked


def install_optimizer_guard() -> None:
    """Check every tracked BOFT model after each step of an optimizer that holds its adapters. Idempotent."""
    global _hook_handle
    if _hook_handle is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _hook_handle = register_optimizer_step_post_hook(_after_optimizer_step)


def remove_optimizer_guard() -> None:
    global _hook_handle
    if _hook_handle is not None:
        _hook_handle.remove()
        _hook_handle = None
