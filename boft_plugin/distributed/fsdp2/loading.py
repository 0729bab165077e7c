"""FSDP2 without a full copy of the base model on any rank: each rank reads its own shards from safetensors.

The order (docs/design.md, "Engines"), used by the recipes' ``fsdp2_pre_shard`` route and by plain PyTorch code:

1. build the transformers model on the meta device (no memory, no random init);
2. add the BOFT adapter(s) (``boft_plugin.register()``; ``get_peft_model``) - still on meta;
3. shard with :func:`boft_plugin.distributed.fsdp2.shard_for_fsdp2` (parameters become meta DTensors);
4. :func:`load_sharded_base_weights`: ``to_empty`` allocates only the local shards, each rank reads its part of every
   base tensor straight from the safetensors files (one tensor slice at a time, one file open at a time), the
   non-persistent buffers (rotary ``inv_freq``) are recomputed, and the adapter is initialised as its config says;
5. optionally :func:`load_adapter_shards`: a trained adapter's tensors (small: read whole) into the shards.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..checkpoint_files import CheckpointIndex, match_checkpoint_keys, read_slice

__all__ = [
    "LoadReport",
    "copy_adapter_shards",
    "load_adapter_shards",
    "load_sharded_base_weights",
    "restore_non_persistent_buffers",
]


@dataclass
class LoadReport:
    """What :func:`load_sharded_base_weights` did on this rank."""

    loaded: list[str] = field(default_factory=list)  # checkpoint keys read (local slices)
    adapter: list[str] = field(default_factory=list)  # adapter tensors left to reset_adapter_parameters
    buffers_recomputed: list[str] = field(default_factory=list)
    local_bytes: int = 0
    seconds: float = 0.0


def mesh_device(model: nn.Module) -> torch.device:
    """The device FSDP2 communicates on for ``model``: its mesh's device type at this rank's current index (the CPU
    for an unsharded model on a machine without an accelerator)."""
    from torch.distributed.tensor import DTensor

    from ..engine import rank_device

    mesh = next((p.device_mesh for p in model.parameters() if isinstance(p, DTensor)), None)
    if mesh is None:
        return rank_device()
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.accelerator.current_device_index())


def _local_index(tensor: Tensor) -> tuple[tuple[slice, ...], Tensor]:
    """(global index of this rank's shard, the local tensor to fill) for a DTensor or a plain tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        from ...runtime.upstream import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        return tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True)), tensor.to_local()
    return tuple(slice(0, s) for s in tensor.shape), tensor


def _is_adapter_tensor(name: str) -> bool:
    return any(part in name.split(".") for part in ("boft_R", "boft_s"))


def restore_non_persistent_buffers(model: nn.Module, saved: dict[str, Tensor] | None = None) -> list[str]:
    """Give every non-persistent buffer its constructor value again after ``to_empty`` (which leaves garbage).

    Buffers in ``saved`` (real values captured before ``to_empty``) are copied back. Any other one is recomputed by
    the owning transformers model's ``_init_weights(module)`` - in transformers 5.24 that recomputes rotary
    embeddings' ``inv_freq`` / ``original_inv_freq`` with the module's own ``rope_type`` (default, linear, llama3,
    yarn, ...). ``_init_weights`` is only called on modules that own no parameters (so no weight is re-initialised).
    Raises ``RuntimeError`` naming any non-persistent buffer nothing could restore. Returns the restored names.
    """
    from transformers import PreTrainedModel

    saved = saved or {}
    owners = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    restored, missing = [], []
    with torch.no_grad():
        for module_name, module in model.named_modules():
            names = [
                n for n in module._buffers if n in module._non_persistent_buffers_set and module._buffers[n] is not None
            ]
            if not names:
                continue
            full = [f"{module_name}.{n}" if module_name else n for n in names]
            if all(f in saved for f in full):
                for n, f in zip(names, full, strict=True):
                    module._buffers[n].copy_(saved[f])
                restored.extend(full)
                continue
            if next(module.parameters(recurse=False), None) is not None or not owners:
                missing.extend(full)
                continue
            # the innermost PreTrainedModel containing this module knows how to initialise it
            owner = next((o for o in reversed(owners) if any(m is module for m in o.modules())), owners[0])
            for n in names:  # transformers' init helpers skip tensors flagged as initialised
                if hasattr(module._buffers[n], "_is_hf_initialized"):
                    del module._buffers[n]._is_hf_initialized
                if module._buffers[n].is_floating_point():
                    module._buffers[n].fill_(float("nan"))  # so that "not written by _init_weights" is detectable
            owner._init_weights(module)
            if not all(
                module._buffers[n].is_floating_point() and torch.isfinite(module._buffers[n]).all() for n in names
            ):
                missing.extend(full)
                continue
            restored.extend(full)
    if missing:
        raise RuntimeError(
            f"non-persistent buffers {missing} cannot be recomputed after to_empty(): capture them before "
            "materialising (pass saved=...) or give their modules an _init_weights rule"
        )
    return restored


def load_sharded_base_weights(
    model: nn.Module,
    checkpoint_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    reset_adapter: bool = True,
    strict: bool = True,
) -> LoadReport:
    """Materialise a meta-device, BOFT-adapted, FSDP2-sharded model and fill each rank's shards from safetensors.

    No rank ever holds a full tensor it does not own: each DTensor gets exactly its local slice
    (``safe_open(...).get_slice(key)[rows]``), plain (unsharded) tensors are read whole. Collective-free: every rank
    reads its own bytes from the (shared) checkpoint directory.

    Args:
        model: the ``PeftModel`` (or plain model) after ``shard_for_fsdp2``, parameters on the meta device.
        checkpoint_dir: a Hugging Face checkpoint directory (``model.safetensors`` or sharded with an index).
        device: where to materialise; default: the device of the model's FSDP2 mesh (its device type, this rank's
            current device index), which is where FSDP2 will all-gather.
        reset_adapter: re-initialise the BOFT adapters as their config says (``reset_adapter_parameters``).
        strict: raise if a base parameter or persistent buffer has no tensor in the checkpoint.

    Key mapping: ``base_model.model.<path>.base_layer.weight`` (PeftModel) -> ``<path>.weight`` (checkpoint);
    tied parameters (``lm_head.weight`` is ``embed_tokens.weight``) are one tensor and loaded once from whichever name
    the checkpoint has; the base model prefix (``model.``) may be present or not in the checkpoint.
    """
    from safetensors import safe_open

    started = time.time()
    report = LoadReport()
    index = CheckpointIndex(checkpoint_dir)
    prefix = getattr(_pretrained(model), "base_model_prefix", None)

    # real values of non-persistent buffers (if the model was built with real buffers) before to_empty wipes them
    saved: dict[str, Tensor] = {}
    for name, buffer in model.named_buffers():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if leaf in module._non_persistent_buffers_set and buffer.device.type != "meta":
            saved[name] = buffer.detach().clone()

    if device is None:
        device = mesh_device(model)
    model.to_empty(device=device)

    match = match_checkpoint_keys(model, index, prefix, skip=_is_adapter_tensor)
    report.adapter.extend(match.skipped)
    work = [(key, _local_index(tensor)) for key, _, tensor in match.found]
    if match.missing and strict:
        raise KeyError(f"{len(match.missing)} base tensors not in {checkpoint_dir}: {match.missing[:8]}")

    with torch.no_grad():
        for file, items in index.group_by_file(work):
            with safe_open(file, framework="pt", device="cpu") as handle:
                for key, (global_index, local) in items:
                    if local.numel() == 0:
                        continue
                    value = read_slice(handle, key, global_index)
                    if tuple(value.shape) != tuple(local.shape):
                        raise ValueError(
                            f"{key}: checkpoint slice {tuple(value.shape)} != local shard {tuple(local.shape)}"
                        )
                    local.copy_(value)
                    report.loaded.append(key)
                    report.local_bytes += local.numel() * local.element_size()
                    del value

    report.buffers_recomputed = restore_non_persistent_buffers(model, saved)
    from ..engine import check_placement

    check_placement(model, torch.device(device))
    if reset_adapter:
        from .shard import reset_adapter_parameters

        reset_adapter_parameters(model)
    report.seconds = time.time() - started
    return report


def load_adapter_shards(model: nn.Module, tensors: dict[str, Tensor], adapter_name: str = "default") -> int:
    """Copy a saved adapter's tensors (PEFT's keys and layout, as ``adapter_loading.read_adapter`` returns them,
    already checked) into a sharded model's adapter tensors.

    The adapter is small: every rank holds it whole, the tuner maps its keys (PEFT's layout on disk, block-major in
    memory) and ``set_model_state_dict`` keeps each rank's shard. Returns the number of tensors loaded.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    peft_model = model
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[PeftType.BOFT]
    remapped = tuner._remap_adapter_state_dict_for_load(
        peft_model, peft_model.peft_config[adapter_name], adapter_name, tensors
    )
    known = set(model.state_dict().keys())
    unknown = sorted(set(remapped) - known)
    if unknown:  # set_model_state_dict(strict=False) would skip them without a word
        raise KeyError(f"{len(unknown)} adapter tensor(s) have no place in this model: {unknown[:4]}")
    set_model_state_dict(model, remapped, options=StateDictOptions(full_state_dict=True, strict=False))
    return len(remapped)


@torch.no_grad()
def copy_adapter_shards(model: nn.Module, source: str = "default", target: str = "ref") -> int:
    """Make adapter ``target`` a frozen copy of ``source`` shard by shard (both sharded alike by FSDP2; no
    communication). The snapshot's ``sync_reference_adapter`` only works before sharding (it refuses a sharded
    target with a gathered source), which is too early on the meta device. Returns the number of tensors copied."""
    params = dict(model.named_parameters())
    copied = 0
    for name, param in params.items():
        parts = name.split(".")
        if source not in parts:
            continue
        other = params.get(".".join(target if p == source else p for p in parts))
        if other is None:
            raise RuntimeError(f"adapter {target!r} has no tensor for {name}")
        src = param.to_local() if hasattr(param, "to_local") else param
        dst = other.to_local() if hasattr(other, "to_local") else other
        dst.copy_(src)
        other.requires_grad_(False)
        copied += 1
    return copied


def _pretrained(model: nn.Module):
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
