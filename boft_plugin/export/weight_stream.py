"""The merged weights of a BOFT model as a stream of ``(name, tensor)``, one gathered tensor at a time.

For handing the policy's current weights to an inference engine (TRL's vLLM weight sync) without touching the
trained model: each base tensor is gathered by every rank (ZeRO-3 / FSDP2: one tensor at a time, collective), an
adapted layer's weight is merged out of place (``W' = W B^T s``, the merge of :func:`.merged.export_merged`), and
the result is yielded and dropped before the next is gathered. Nothing is merged into the model and nothing is
unmerged after, so there is no bf16 merge/unmerge drift, and no rank holds more than one gathered base tensor with
its merge (and that layer's gathered ``boft_R`` / ``boft_s``). Parameters only, as TRL's own sync yields (buffers
are not weights vLLM loads). Names are the plain transformers model's (``model.layers.0.self_attn.q_proj.weight``);
a tied weight is yielded once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..distributed.gather import full_tensor, settle_zero3, unwrap_peft_model
from .merged import _merged_weight, _untied_plain_tensors

__all__ = ["iter_merged_weights"]


def iter_merged_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Collective: every rank iterates to the end (the gathers are collectives); see the module docstring.

    Args:
        model: a ``PeftModel`` with BOFT adapters, or what wraps one (DDP, DeepSpeed engine, FSDP2-sharded).

    Yields:
        ``(name, tensor)``: the plain model's key and its full (gathered) value, merged for an adapted weight
        (``(out, in)`` for a linear layer), on this rank's device; valid until the next item is requested.
    """
    settle_zero3(model)
    base_model = unwrap_peft_model(model).get_base_model()
    with torch.no_grad():
        for key, tensor, layer in _untied_plain_tensors(base_model, buffers=False):  # parameters, as TRL's sync
            if getattr(tensor, "quant_state", None) is not None or tensor.dtype in (torch.uint8, torch.int8):
                raise NotImplementedError(
                    f"{key} is quantised: streaming merged weights of a quantised base is not supported (merge "
                    "with export_merged, which reads a full-precision checkpoint)"
                )
            value = full_tensor(tensor, prefer_fp32_master=False)  # collective
            if layer is not None:
                value = _merged_weight(layer, value)
            yield key, value
            del value
