"""Gather full tensors from any layout: plain/DDP, DeepSpeed ZeRO-1/2/3, FSDP2 (DTensor).

Every function here is *collective* when a process group is initialised: all ranks must call it with the same
tensors in the same order.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..tuner.state_dict import is_partitioned

__all__ = ["full_tensor", "is_partitioned", "settle_zero3", "unwrap_peft_model"]


def _is_dtensor(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: Tensor, prefer_fp32_master: bool = True) -> Tensor:
    """The full value of a parameter or buffer, detached, on its device (collective for sharded tensors).

    Under DeepSpeed the fp32 master copy of a trainable parameter is returned when one exists (bf16/fp16
    training keeps the exact value there), else the gathered module parameter.
    """
    if (
        prefer_fp32_master
        and getattr(tensor, "requires_grad", False)
        and (hasattr(tensor, "ds_id") or hasattr(tensor, "_hp_mapping"))
    ):
        from deepspeed.utils import safe_get_full_fp32_param

        try:
            master = safe_get_full_fp32_param(tensor)
        except AttributeError:  # ZeRO-3 model without an optimizer (inference engine)
            master = None
        if master is not None:
            return master.detach().reshape(getattr(tensor, "ds_shape", tensor.shape))
    if hasattr(tensor, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
            return tensor.data.detach().clone()
    if _is_dtensor(tensor):
        return tensor.full_tensor().detach()
    return tensor.detach()


def unwrap_peft_model(model: nn.Module):
    """Find the ``PeftModel`` inside DDP / DeepSpeed / accelerate / ``torch.compile`` wrappers."""
    from peft import PeftModel

    current = model
    for _ in range(16):
        if isinstance(current, PeftModel):
            return current
        if hasattr(current, "_orig_mod"):
            current = current._orig_mod
        elif isinstance(getattr(current, "module", None), nn.Module):
            current = current.module
        else:
            break
    raise TypeError(f"expected a PEFT model (possibly wrapped by DDP/DeepSpeed/accelerate), got {type(model).__name__}")


def settle_zero3(model: nn.Module) -> None:
    """Wait for ZeRO-3 parameters a DeepSpeed engine still has in flight (prefetched) before gathering."""
    if hasattr(model, "empty_partition_cache"):
        model.empty_partition_cache()
