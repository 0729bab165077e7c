"""TRL's vLLM weight sync (GRPO / RLOO, ``use_vllm: true``) fed by a stream of BOFT's merged weights.

TRL 1.16's ``VLLMGeneration.sync_weights`` pushes ``_iter_named_params()`` to vLLM (colocate: ``load_weights`` per
tensor; server: ``update_named_params`` over NCCL). For a PEFT model that iterator gathers *every* parameter at once
under ZeRO-3, merges the adapter into the trained weights, yields them and unmerges (whole model per rank, and a
bf16 merge/unmerge round trip that drifts). :class:`StreamedWeightSync` keeps TRL's ``sync_weights`` and replaces
only that iterator with :func:`boft_plugin.export.weight_stream.iter_merged_weights`: one gathered tensor at a time,
merged out of place, the trained weights never touched. Names go through TRL's own ``_fix_param_name_to_vllm``.

:func:`stream_weight_sync` gives a trainer's ``vllm_generation`` this class (it only adds the override; TRL builds
the object inside its trainer's constructor, so the class is set on the built object).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor
from trl.generation.vllm_generation import VLLMGeneration

from ..export.weight_stream import iter_merged_weights

__all__ = ["StreamedWeightSync", "stream_weight_sync"]


class StreamedWeightSync(VLLMGeneration):
    """TRL's ``VLLMGeneration`` whose weight sync streams the merged BOFT weights (module docstring)."""

    boft_trainer = None  # set by stream_weight_sync: its model_wrapped is the DeepSpeed engine once training runs

    def _iter_named_params(self) -> Iterator[tuple[str, Tensor]]:
        """Collective, as TRL's: every rank iterates (the gathers are collectives); rank 0's values are pushed."""
        wrapped = getattr(self.boft_trainer, "model_wrapped", None)
        for name, tensor in iter_merged_weights(wrapped if wrapped is not None else self.model):
            yield self._fix_param_name_to_vllm(name), tensor


def stream_weight_sync(trainer) -> bool:
    """Make ``trainer.vllm_generation`` (when TRL built one) a :class:`StreamedWeightSync`; True if it did."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None or not isinstance(generation, VLLMGeneration):
        return False
    generation.__class__ = StreamedWeightSync
    generation.boft_trainer = trainer
    return True
