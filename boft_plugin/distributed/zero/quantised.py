"""A bitsandbytes-quantised base under ZeRO-3: loaded quantised on each rank, partitioned by DeepSpeed.

transformers does not build a quantised model under ``zero.Init`` (and refuses a ``device_map`` under ZeRO-3), so
each rank first holds the whole quantised base on its current device; DeepSpeed then partitions every parameter
when the Trainer prepares the engine, the packed codes included (4-bit codes in bitsandbytes' uint8 or a float
``bnb_4bit_quant_storage``, and 8-bit weights, were all partitioned in a probe; the suite tests 4-bit with bf16
storage). The quant state is a plain attribute of the weight, not a parameter,
so it stays whole on every rank and is still attached when DeepSpeed gathers the codes for a forward.
:class:`ReportQuantisedPartition` says, once training starts, how many quantised layers this rank holds only a
partition of.
"""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback

__all__ = ["ReportQuantisedPartition", "quantised_partition_counts"]

_QUANTISED_WEIGHTS = ("Params4bit", "Int8Params")


def quantised_partition_counts(model: nn.Module) -> tuple[int, int]:
    """``(partitioned, total)`` bitsandbytes layers of ``model``: partitioned when DeepSpeed keeps only this
    rank's slice of the weight (``ds_tensor`` smaller than ``ds_numel``) and the parameter itself is released."""
    partitioned = total = 0
    for module in model.modules():
        weight = module._parameters.get("weight")
        if type(weight).__name__ not in _QUANTISED_WEIGHTS:
            continue
        total += 1
        shard = getattr(weight, "ds_tensor", None)
        if shard is not None and shard.numel() < weight.ds_numel and weight.numel() == 0:
            partitioned += 1
    return partitioned, total


class ReportQuantisedPartition(TrainerCallback):
    """Logs ``ZeRO-3: P of N quantised layers partitioned`` on each rank when training starts (the engine exists)."""

    def __init__(self, log) -> None:
        self._log = log

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            partitioned, total = quantised_partition_counts(model)
            self._log(f"ZeRO-3: {partitioned} of {total} quantised layers partitioned")
