"""The tuner's state-dict boundary: what an adapter's tensors must look like, and how they cross to and from disk.

Everything that reads or writes adapter tensors goes through here (``BoftTuner``'s PEFT hooks, the exporter, the
adapter loader, the sharding glue):

- expected shapes of every adapter tensor, from live layers (:func:`expected_adapter_shapes`) or from a plan of a
  model not adapted yet (:func:`planned_adapter_shapes`), and :func:`check_adapter_tensors` against them;
- the storage layout: ``boft_R`` is PEFT's ``(m, N, b, b)`` on disk and may be held block-major ``(N, m, b, b)`` in
  memory for FSDP2 (:func:`block_major_layers`, :func:`to_peft_layout`, :func:`from_peft_layout`);
- refusal to write partitioned tensors (ZeRO-3 ``[0]`` partitions, DTensor shards): :func:`refuse_partitioned`;
- :func:`unchecked_selection`: the one switch for a gathering exporter, which asks PEFT which live (possibly still
  partitioned) tensors form an adapter *before* it gathers them, so they must not be refused or transposed yet.

See docs/design.md, "Checkpoint contract".
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..errors import BoftSaveError
from .layer import BoftLayer

__all__ = [
    "PEFT_PREFIX",
    "block_major_layers",
    "check_adapter_tensors",
    "expected_adapter_shapes",
    "from_peft_layout",
    "is_partitioned",
    "planned_adapter_shapes",
    "refuse_partitioned",
    "selection_is_unchecked",
    "to_peft_layout",
    "unchecked_selection",
]

PEFT_PREFIX = "base_model.model."

Shapes = dict[str, dict[str, tuple[int, ...]]]  # {module path without PEFT_PREFIX: {"boft_R": shape, "boft_s": shape}}

_unchecked = contextvars.ContextVar("boft_unchecked_selection", default=False)


@contextlib.contextmanager
def unchecked_selection() -> Iterator[None]:
    """Within this context ``BoftTuner``'s PEFT state-dict hook selects tensors as they are (no refusal of
    partitioned tensors, no layout change): for an exporter that gathers and restores the layout afterwards."""
    token = _unchecked.set(True)
    try:
        yield
    finally:
        _unchecked.reset(token)


def selection_is_unchecked() -> bool:
    return _unchecked.get()


def is_partitioned(tensor: Tensor) -> bool:
    """True when ``tensor`` holds only this rank's share (a ZeRO-3 partition not gathered now, or a DTensor)."""
    if hasattr(tensor, "ds_id"):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        return tensor.ds_status != ZeroParamStatus.AVAILABLE
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def refuse_partitioned(state_dict: dict[str, Tensor]) -> None:
    """Raise :class:`BoftSaveError` if any tensor holds only this rank's shard (ZeRO-3 ``[0]``, a DTensor)."""
    bad = [f"{k} {tuple(v.shape)}" for k, v in state_dict.items() if is_partitioned(v) or v.numel() == 0]
    if bad:
        raise BoftSaveError(
            f"refusing to save {len(bad)} partitioned adapter tensor(s) (e.g. {', '.join(bad[:3])}): under "
            "DeepSpeed ZeRO-3 or FSDP each rank holds only its shard, and saving them as is would write empty or "
            "partial tensors. Call boft_plugin.export_adapter(model, output_dir) on every rank instead (it gathers "
            "and writes on rank 0), or pass a gathered state_dict to save_pretrained."
        )


def block_major_layers(model: nn.Module) -> list[tuple[str, BoftLayer, str]]:
    """``("<module path>.boft_R", layer, adapter)`` for every adapter stored block-major (FSDP2).

    One entry per (layer, adapter): a layer may hold several block-major adapters (DPO's policy and reference).
    """
    return [
        (f"{name}.boft_R", module, adapter)
        for name, module in model.named_modules()
        if isinstance(module, BoftLayer)
        for adapter, block_major in module.boft_block_major.items()
        if block_major
    ]


def to_peft_layout(model: nn.Module, selected: dict[str, Tensor]) -> dict[str, Tensor]:
    """``selected`` (PEFT's selection, keys with adapter names) with every block-major ``boft_R`` in PEFT's layout."""
    result = dict(selected)
    for prefix, layer, adapter in block_major_layers(model):
        key = f"{prefix}.{adapter}"
        if key in result:
            result[key] = layer.to_peft_layout(adapter, result[key])
    return result


def from_peft_layout(model: nn.Module, adapter_name: str, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's state dict (keys without adapter names) with ``boft_R`` transposed where this model holds
    ``adapter_name`` block-major."""
    result = dict(state_dict)
    for prefix, _, adapter in block_major_layers(model):
        if adapter == adapter_name and prefix in result:
            result[prefix] = result[prefix].transpose(0, 1).contiguous()
    return result


def expected_adapter_shapes(model: nn.Module, adapter_name: str) -> Shapes:
    """Expected tensor shapes of adapter ``adapter_name`` from the layers that hold it."""
    shapes: Shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, BoftLayer) and adapter_name in module.boft_geometry:
            shapes[name.removeprefix(PEFT_PREFIX)] = module.adapter_shapes(adapter_name)
    return shapes


def planned_adapter_shapes(plans: dict) -> Shapes:
    """Expected tensor shapes from ``targets.plan_targets`` output (a model not adapted yet)."""
    return {name: {"boft_R": plan.geometry.param_shape, "boft_s": plan.scale_shape} for name, plan in plans.items()}


def _module_of(key: str) -> tuple[str, str] | None:
    """``'base_model.model.a.b.boft_R'`` -> ``('a.b', 'boft_R')``; None for non-adapter keys."""
    for suffix in ("boft_R", "boft_s"):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1].removeprefix(PEFT_PREFIX), suffix
    return None


def _factor_count_differs(name: str, found: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """A ``boft_R`` whose blocks fit but whose number of butterfly factors does not."""
    return name == "boft_R" and found[1:] == tuple(shape[1:]) and found[0] != shape[0]


def _shape_problem(module: str, name: str, found: tuple[int, ...], shape: tuple[int, ...], m_config) -> str:
    message = f"{PEFT_PREFIX}{module}.{name}: shape {found} in the file, {tuple(shape)} expected"
    if _factor_count_differs(name, found, shape):
        message += (
            f" (adapter_config.json says boft_n_butterfly_factor={m_config} but the tensors hold {found[0]} factor(s)"
        )
        message += (
            ": this is what stock PEFT writes when its CUDA extension cannot build, it trains with one "
            "factor and keeps the configured value in the file)"
            if found[0] == 1
            else ")"
        )
    return message


def check_adapter_tensors(tensors: dict[str, Tensor], expected: Shapes, config: dict) -> list[str]:
    """Problems of a checkpoint's tensors against the expected shapes (empty list: the checkpoint fits)."""
    problems: list[str] = []
    found: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            problems.append(f"{key}: {bad} of {tensor.numel()} values are NaN or Inf")
        owner = _module_of(key)
        if owner:
            found.setdefault(owner[0], {})[owner[1]] = tensor
    m_config = config.get("boft_n_butterfly_factor")
    factors_differ = False
    for module, shapes in expected.items():
        if module not in found:
            problems.append(f"{module}: targeted by the config in this model, but the file has no tensors for it")
            continue
        for name, shape in shapes.items():
            tensor = found[module].get(name)
            if tensor is None:
                problems.append(f"{PEFT_PREFIX}{module}.{name}: missing from the file")
            elif tuple(tensor.shape) != tuple(shape):
                problems.append(_shape_problem(module, name, tuple(tensor.shape), shape, m_config))
                factors_differ |= _factor_count_differs(name, tuple(tensor.shape), shape)
    for module in sorted(set(found) - set(expected)):
        problems.append(
            f"{PEFT_PREFIX}{module}: the file has an adapter for this module, which this model does not have or the "
            "config does not target (an adapter for another base model?)"
        )
    if factors_differ:
        problems.append(
            "remedy: load the adapter as what it really is with boft_plugin.load_adapter(model, path, "
            "butterfly_factor='tensors') (or set boft_n_butterfly_factor to the tensors' count in "
            "adapter_config.json)"
        )
    return problems
