"""``generate`` on an FSDP2-sharded ``PeftModel`` (GRPO / RLOO), one unit gathered at a time.

FSDP2's root unit is the ``PeftModel`` (the module ``fully_shard`` was applied to last), but ``generate`` runs the
causal LM inside it, so the root's forward hooks never fire:

- the root's own parameters (what no block or embedding unit holds, e.g. the final norm) would stay sharded
  DTensors: :func:`sharded_generation` gathers them for the generation and frees them after (public
  ``unshard`` / ``reshard``, not recursive: each block unit still gathers itself in its own forward);
- FSDP2 names as root the first unit that runs a forward; were that a block inside ``generate``, the next
  training forward through the real root would fail. A one-token forward through the root, once, settles it;
- transformers' ``generate`` keeps the ranks in step (``synced_gpus``) only for a module it knows is FSDP-managed
  (``_is_fsdp_managed_module``, which its own FSDP2 path sets): without it a rank whose completions all ended
  would stop calling forward while the others wait in its all-gathers. :func:`mark_fsdp_managed` sets it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["mark_fsdp_managed", "sharded_generation"]

_ROOT_READY = "_boft_fsdp2_root_ready"


def mark_fsdp_managed(peft_model: nn.Module) -> None:
    """Tell transformers' ``generate`` that the model is FSDP-managed (it then syncs the ranks' decoding loops)."""
    peft_model._is_fsdp_managed_module = True
    peft_model.get_base_model()._is_fsdp_managed_module = True


@contextlib.contextmanager
def sharded_generation(peft_model: nn.Module) -> Iterator[None]:
    """Collective: around one ``generate`` of ``peft_model`` (the FSDP2 root), see the module docstring."""
    import torch

    if not getattr(peft_model, _ROOT_READY, False):
        device = next(iter(peft_model.parameters())).device
        with torch.no_grad():
            peft_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))  # the root's lazy init
        setattr(peft_model, _ROOT_READY, True)
    peft_model.unshard()
    try:
        yield
    finally:
        peft_model.reshard()
