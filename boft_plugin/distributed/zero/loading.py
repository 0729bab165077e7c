"""DeepSpeed ZeRO-3 without a full copy of the base model on any rank: each rank reads its own partitions.

transformers 5.24's ``from_pretrained`` under ``zero.Init`` has rank 0 open every checkpoint file, gathers each
module on every rank and broadcasts the loaded values (measured: 3.0-3.4 GiB per rank right after loading a 0.9B
fp32 model on 2 ranks; docs/design.md, "Engines"). Here the model is built empty under ``zero.Init``
(``from_config``: already partitioned) and :func:`load_zero3_partitions` fills each rank's flat partition of every
parameter straight from the safetensors files, one slice at a time, with no collective at all.

A ZeRO-3 parameter's partition on rank ``r`` of its group holds elements ``[r * P, min((r + 1) * P, numel))`` of
the flattened tensor (``P = param.ds_tensor.ds_numel``, the last partition zero-padded).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from ..checkpoint_files import CheckpointIndex, match_checkpoint_keys, read_flat_range

__all__ = ["empty_zero3_model", "load_zero3_partitions"]


def _from_config(model_class, config, dtype, attn_implementation):
    """transformers' own route: ``from_config`` under the active ``zero.Init`` (partitioned, initialised)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_config(config, **kwargs)


def empty_zero3_model(model_class, config, dtype, attn_implementation: str | None = None):
    """``model_class(config)`` built under ``zero.Init`` with nothing initialised and nothing communicated.

    transformers' own ``from_config`` under ZeRO-3 broadcasts every parameter's (uninitialised) bytes from rank 0 while
    constructing, then gathers every module to initialise it on rank 0 and broadcasts it again: three passes of the
    whole model through the network, for values :func:`load_zero3_partitions` overwrites right after (measured: about
    20 s of a 21 s load of a 0.9B model on 2 CPU ranks). Here every parameter is only partitioned. Falls back to
    ``from_config`` (slower, same result) if transformers' or DeepSpeed's construction helpers are not the ones this
    was written for (transformers 5.24, DeepSpeed 0.19). The caller must load every parameter afterwards.
    """
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config

    try:
        from transformers.initialization import no_init_weights
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
        from transformers.modeling_utils import ContextManagers, local_torch_dtype, set_zero3_state
        from transformers.monkey_patching import apply_patches, patch_output_recorders
    except ImportError:
        return _from_config(model_class, config, dtype, attn_implementation)
    if not callable(getattr(deepspeed.zero.Init, "_convert_to_deepspeed_param", None)):
        return _from_config(model_class, config, dtype, attn_implementation)

    class PartitionOnlyInit(deepspeed.zero.Init):
        def _zero_init_param(self, param):  # DeepSpeed broadcasts rank 0's bytes first: not needed, all is loaded
            self._convert_to_deepspeed_param(param)
            param.partition()

    config.dtype = dtype
    if attn_implementation:
        config._attn_implementation = attn_implementation
    contexts = [
        apply_patches(),
        local_torch_dtype(dtype, model_class.__name__),
        no_init_weights(),
        prevent_arange_dtype_change(),
        PartitionOnlyInit(config_dict_or_path=deepspeed_config()),
        set_zero3_state(),
    ]
    with ContextManagers(contexts):
        model = model_class(config)
        patch_output_recorders(model)
    model.tie_weights()  # no_init_weights skips it; untied, a tied checkpoint would lack lm_head.weight
    return model


def load_zero3_partitions(model: nn.Module, checkpoint_dir: str | os.PathLike) -> dict | None:
    """Fill every ZeRO-3 partition of ``model`` (built under ``zero.Init``) from a safetensors checkpoint.

    Parameters that ZeRO-3 did not partition and persistent buffers are read whole on every rank. Collective-free:
    every rank reads its own bytes. Returns a report (tensors, local GiB, seconds), or None, with nothing loaded,
    when some parameter has no tensor in the checkpoint under its own name.
    """
    import torch.distributed as dist
    from safetensors import safe_open

    started = time.time()
    index = CheckpointIndex(checkpoint_dir)
    match = match_checkpoint_keys(model, index, getattr(model, "base_model_prefix", None))
    if match.missing:  # a checkpoint that needs transformers' key conversions: the caller uses from_pretrained
        return None
    work = [(key, tensor) for key, _, tensor in match.found]
    local_bytes = 0
    with torch.no_grad():
        for file, items in index.group_by_file(work):
            with safe_open(file, framework="pt", device="cpu") as handle:
                for key, tensor in items:
                    if hasattr(tensor, "ds_id"):
                        part = tensor.ds_tensor
                        size = part.ds_numel
                        group_rank = dist.get_rank(group=tensor.ds_process_group)
                        start = size * group_rank
                        stop = min(start + size, tensor.ds_numel)
                        if start < stop:
                            flat = read_flat_range(handle, key, start, stop)
                            part.data.view(-1)[: stop - start].copy_(flat)
                            local_bytes += flat.numel() * part.element_size()
                    else:
                        value = handle.get_tensor(key)
                        if tuple(value.shape) != tuple(tensor.shape):
                            raise ValueError(f"{key}: checkpoint {tuple(value.shape)} != model {tuple(tensor.shape)}")
                        tensor.data.copy_(value)
                        local_bytes += value.numel() * value.element_size()
    return {"tensors": len(work), "local_gib": local_bytes / 2**30, "seconds": time.time() - started}
